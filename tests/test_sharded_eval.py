"""`advcl eval` under torchrun: 2 gloo processes split the test images and give exactly the
per-image results of one process (random starts and AutoAttack's seed follow the image blocks,
not the ranks); rank 0 alone prints, and its progress counts both ranks' images."""

import json

import pytest

from advcl_cli.checkpoint import save_model
from test_attacks import train_tiny_classifier
from test_distributed import torchrun


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    model = train_tiny_classifier(image_size=16)
    return save_model(tmp_path_factory.mktemp("sharded") / "clf.safetensors", model, kind="classifier",
                      method="advcl", dataset="digits", config={"image_size": 16})


def one_and_two(run_cli, *args):
    code, out, err = run_cli(*args)
    assert code == 0, err
    two = torchrun(2, "-m", "advcl_cli", *map(str, args))
    assert two.returncode == 0, two.stderr[-3000:]
    return json.loads(out), json.loads(two.stdout), two.stderr  # rank 0 alone prints: one document


def test_two_processes_give_the_per_image_results_of_one(run_cli, classifier):
    # 117 images in blocks of 14: 9 blocks, the last one partial; rank 0 takes 5, rank 1 takes 4
    args = ["eval", classifier, "-a", "pgd3", "-a", "fgsm", "--eps", "24/255", "--limit", "117",
            "--batch-size", "14", "--device", "cpu", "--json", "--per-image"]
    one, two, err = one_and_two(run_cli, *args)
    flags = one["per_image"]
    assert set(flags) == {"clean", "pgd3@24/255", "fgsm@24/255", "worst@24/255"}
    assert all(len(f) == 117 for f in flags.values())
    assert two["per_image"] == flags
    assert (two["n"], two["clean_acc"], two["worst_case"]) == (one["n"], one["clean_acc"], one["worst_case"])
    assert [r["robust_acc"] for r in two["robust"]] == [r["robust_acc"] for r in one["robust"]]
    assert 0 < flags["pgd3@24/255"].count("1") < flags["clean"].count("1")  # the attack matters, not trivially
    assert "pgd3 eps=24/255 117/117" in err and "fgsm eps=24/255 117/117" in err  # both ranks' images counted

    # the random starts matter here: another seed changes the PGD flags, so equal flags above
    # mean both runs drew the same starts for every image
    code, out, _ = run_cli(*args, "--seed", "1")
    assert code == 0 and json.loads(out)["per_image"]["pgd3@24/255"] != flags["pgd3@24/255"]


def test_autoattack_on_two_processes_matches_one(run_cli, classifier):
    # eps large enough that APGD-CE breaks every image: FAB-T and Square would cost about a
    # second per surviving image on a CPU. 4 images in blocks of 2: one block per rank.
    args = ["eval", classifier, "-a", "autoattack", "--eps", "24/255", "--limit", "4", "--batch-size", "2",
            "--device", "cpu", "--json", "--per-image"]
    one, two, _ = one_and_two(run_cli, *args)
    assert one["per_image"] == two["per_image"] and len(one["per_image"]["autoattack@24/255"]) == 4
    assert one["robust"][0]["robust_acc"] == two["robust"][0]["robust_acc"] < one["clean_acc"]
