"""What the Hub accepts in a model card's metadata, checked here before anything is sent.

The Hub refuses a commit whose README.md metadata it does not accept (an unknown licence id,
for one), after the weights were uploaded; advcl checks the same rules first and exits 2 naming
the field. The licence ids are the Hub's list (docs/hub/repositories-licenses.md in
huggingface/hub-docs, plus the Llama licences it has added since); the dataset ids are the
Hub's copies of the datasets advcl knows (``cifar10`` is ``uoft-cs/cifar10`` there).
"""

from __future__ import annotations

import difflib
import re
from numbers import Real
from typing import Any

from ..errors import UsageError

LICENSES_URL = "https://huggingface.co/docs/hub/repositories-licenses"
HUB_LICENSES = frozenset("""
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear
    c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0
    cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0
    cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl
    ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1
    lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa
    unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4
    gemma unknown other
""".split())
# advcl's dataset names -> the Hub's dataset ids; stl10, digits and imagefolder have no canonical copy there
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
PIPELINE_TAGS = {"image-classification", "image-feature-extraction"}
TASK_TYPES = {"image-classification"}
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TAG_RE = re.compile(r"^[\w.:/+-]{1,128}$")


def repo_id_problem(repo: str) -> str | None:
    """Why ``repo`` is no Hub repository id ORG/NAME (huggingface_hub's ``validate_repo_id``:
    no '..', no '-' or '.' at either end, ...), or None when it is one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not HUB_ID_RE.match(repo):
        return "not a repository id ORG/NAME"
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        return " ".join(str(e).split()).removesuffix(f": '{repo}'.")
    return None


def filename_problem(filename: str) -> str | None:
    """Why ``filename`` names no file inside a repository (empty, absolute, a '.' or '..' part,
    a backslash, a control character), or None: a name from a manifest or an hf: name is joined
    to the cache folder and must stay in it."""
    parts = filename.split("/")
    if not filename or filename.startswith("/") or "\\" in filename or any(p in ("", ".", "..") for p in parts):
        return "a file in the repository is a relative path without '.', '..' or empty parts"
    if not filename.isprintable():
        return "a file name has no control characters"
    return None


def bad_card(field: str, message: str, hint: str | None = None) -> UsageError:
    return UsageError(f"model card metadata, field '{field}': {message}", hint)


def check_license(value: str) -> str:
    """A licence id the Hub accepts (lower-cased), or a UsageError with close ids."""
    license = value.strip().lower()
    if license == "other":
        raise bad_card("license", "'other' needs a licence name, link and LICENSE file, which advcl push does not write",
                       "push with an id from the Hub's list, then edit the card on the Hub: advcl keeps an edited card")
    if license not in HUB_LICENSES:
        close = difflib.get_close_matches(license, sorted(HUB_LICENSES), n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(close)}? " if close else "") + f"the Hub's licence ids are listed at {LICENSES_URL}"
        raise bad_card("license", f"'{value}' is not a licence id the Hub accepts", hint)
    return license


def _hub_id(field: str, value: Any, kind: str) -> None:
    if not isinstance(value, str) or not HUB_ID_RE.match(value):
        raise bad_card(field, f"{value!r} is not a Hub {kind} id (ORG/NAME)")


def _text(field: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise bad_card(field, f"expected a non-empty string, got {value!r}")


def validate_card_data(data: dict[str, Any], repo: str) -> None:
    """The metadata of a card for ``repo`` as the Hub would check it; a UsageError names the field."""
    check_license(str(data.get("license") or ""))
    for i, dataset in enumerate(data.get("datasets") or []):
        if dataset not in HUB_DATASETS.values():
            raise bad_card(f"datasets[{i}]", f"{dataset!r} is not one of the Hub dataset ids advcl knows ({', '.join(HUB_DATASETS.values())})")
    base = data.get("base_model")
    for i, model in enumerate(base if isinstance(base, list) else [base] if base is not None else []):
        _hub_id(f"base_model[{i}]" if isinstance(base, list) else "base_model", model, "model")
        if model == repo:
            raise bad_card("base_model", f"{model} is the repository being pushed to")
    relation = data.get("base_model_relation")
    if relation is not None and (base is None or relation not in BASE_MODEL_RELATIONS):
        raise bad_card("base_model_relation", f"{relation!r} needs a base_model and one of {', '.join(sorted(BASE_MODEL_RELATIONS))}")
    if data.get("pipeline_tag") not in PIPELINE_TAGS | {None}:
        raise bad_card("pipeline_tag", f"{data['pipeline_tag']!r} is not one of {', '.join(sorted(PIPELINE_TAGS))}")
    if data.get("library_name") is not None and not TAG_RE.match(str(data["library_name"])):
        raise bad_card("library_name", f"{data['library_name']!r} is not a library name")
    for i, tag in enumerate(data.get("tags") or []):
        if not isinstance(tag, str) or not TAG_RE.match(tag):
            raise bad_card(f"tags[{i}]", f"{tag!r} is not a tag (letters, digits, '-', '_', '.', ':', '/', '+')")
    index = data.get("model-index")
    if index is None:
        return
    if not isinstance(index, list) or len(index) != 1 or not isinstance(index[0], dict):
        raise bad_card("model-index", "expected one entry")
    _text("model-index[0].name", index[0].get("name"))
    for i, result in enumerate(index[0].get("results") or []):
        where = f"model-index[0].results[{i}]"
        task, dataset, metrics = result.get("task") or {}, result.get("dataset") or {}, result.get("metrics") or []
        if task.get("type") not in TASK_TYPES:
            raise bad_card(f"{where}.task.type", f"{task.get('type')!r} is not one of {', '.join(sorted(TASK_TYPES))}")
        _text(f"{where}.dataset.type", dataset.get("type"))
        _text(f"{where}.dataset.name", dataset.get("name"))
        if "/" in dataset["type"] and dataset["type"] not in HUB_DATASETS.values():
            raise bad_card(f"{where}.dataset.type", f"{dataset['type']!r} is not a Hub dataset id advcl knows")
        if not metrics:
            raise bad_card(f"{where}.metrics", "a result needs at least one metric")
        for j, metric in enumerate(metrics):
            _text(f"{where}.metrics[{j}].type", metric.get("type"))
            value = metric.get("value")
            if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 100:
                raise bad_card(f"{where}.metrics[{j}].value", f"{value!r} is not an accuracy in percent")
