"""RCS's selection the way the authors' ``RCS.update_subset_indice`` computes it (tests only).

Written from GodXuxilie/Efficient_ACL_via_RCS ``ACL_RCS/small_scale_datasets/RCS.py`` in its
structure, with nothing from ``advcl_cli`` but the network it is handed (``model.backbone`` and
``model.proj``, the ACL family's head ``fc1/bn1/fc2/bn2/fc3/bn3``) and the candidate batches'
views (drawn by the caller's ``views(images)``, the draws of its augmentation):

- the validation batch is the loader's ``(b, 2, C, H, W)`` pair of identical un-augmented copies,
  ``.view(2b, ...)[:b]``; their ``PGD``: delta from eps * U(-1, 1), 3 steps of (10/255)/3 on
  ``kl_loss(features, nat_feature)`` of ``model.eval()(inputs + delta, 'pgd')`` against the
  clean ``'normal'`` output, delta clamped to [-eps, eps] and to [0, 1] - inputs;
- ``normalize`` in place (``AA -= min; AA /= max``), ``kl_loss(nat, adv)`` =
  ``KLDivLoss(mean)(log(normalize(adv) + 1e-8), normalize(nat) + 1e-8)``, the validation loss
  ``kl_loss(features_adv, features)`` on the head's outputs of the backbone features;
- each candidate batch: the views interleaved, ``PGD_contrastive`` (tests/reference/acl_step.py),
  ``(nt_xent(features) + nt_xent(features_adv)) / 2`` on the head, every ``fc`` parameter's
  gradient kept whole and as ``g.mean(dim=0).view(1, -1)``;
- the greedy over ``int(budget / batch_size)`` rounds, the head's ``fc`` weights moved by
  ``- lr * g`` through ``linear_layer`` and again through ``model.fc`` (one module), the
  validation gradient recomputed, the chosen batch removed; the head restored at the end.

The random draws come from ``gen`` in the order advcl's selection documents: the validation
starts, the candidates' permutation, per candidate its views and random starts, then the
validation starts of every later round.
"""

from __future__ import annotations

import torch

from .acl_step import IMAGENET, interleave, nt_xent, pgd_contrastive


def get_feature(model, x, bn_name):
    mean = torch.tensor(IMAGENET[0]).to(x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET[1]).to(x.dtype).view(1, 3, 1, 1)
    return model.backbone((x - mean) / std, bn_name)


def full(model, x, bn_name):
    return model.proj(get_feature(model, x, bn_name), bn_name)


def normalize(AA):
    AA -= AA.min(1, keepdim=True)[0]
    AA /= AA.max(1, keepdim=True)[0]
    return AA


def kl_loss(nat, adv):
    P = torch.log(normalize(adv) + 1e-8)
    Q = normalize(nat) + 1e-8
    return torch.nn.KLDivLoss(reduction="mean")(P, Q)


def PGD(model, inputs, uniform, eps=8 / 255, alpha=(10 / 255) / 3, iters=3):
    delta = uniform * eps
    nat_feature = full(model.eval(), inputs, "normal").detach()
    for _ in range(iters):
        delta = delta.detach().requires_grad_(True)
        features = full(model.eval(), inputs + delta, "pgd")
        (grad,) = torch.autograd.grad(kl_loss(features, nat_feature), [delta])
        delta = delta.detach() + alpha * grad.sign()
        delta = torch.clamp(delta, min=-eps, max=eps)
        delta = torch.clamp(inputs + delta, min=0, max=1) - inputs
    return (inputs + delta).detach()


def fc_params(linear_layer):
    return [p for name, p in linear_layer.named_parameters() if "fc" in name]


def valid_grad(model, val, gen, batch_size):
    feature_val_nat, feature_val_adv = [], []
    for valid_inputs in val.split(batch_size):
        d = valid_inputs.shape[0]
        valid_inputs = torch.stack([valid_inputs, valid_inputs], 1).view(d * 2, *valid_inputs.shape[1:])[:d]
        uniform = (torch.rand(valid_inputs.shape, generator=gen) * 2 - 1).double()
        valid_inputs_adv = PGD(model, valid_inputs, uniform)
        with torch.no_grad():
            feature_val_adv.append(get_feature(model, valid_inputs_adv, "pgd"))
            feature_val_nat.append(get_feature(model, valid_inputs, "normal"))
    linear_layer = model.proj
    features = linear_layer(torch.cat(feature_val_nat), "normal")
    features_adv = linear_layer(torch.cat(feature_val_adv), "pgd")
    valid_loss = kl_loss(features_adv, features)
    grads = torch.autograd.grad(valid_loss, fc_params(linear_layer))
    return torch.cat([g.detach().mean(dim=0).view(1, -1) for g in grads], dim=1)


def select(model, images, val, views, *, gen, fraction, batch_size, pgd_iter=5, lr=0.01):
    """The chosen positions of ``images`` (uint8), the list of gains of every round, and the
    validation gradients; ``val`` the validation images (uint8), ``views(batch) -> (x1, x2)``."""
    model.eval()
    val = val.double() / 255
    linear_layer = model.proj
    ori = {k: v.clone() for k, v in linear_layer.state_dict().items()}
    grad_val = valid_grad(model, val, gen, batch_size)
    first_grad_val = grad_val
    batches = torch.randperm(len(images), generator=gen).split(batch_size)
    per_batch_grads, per_batch_ori_grads = [], []
    for idx in batches:
        x1, x2 = views(images[idx])
        uniform = torch.rand((2, *x1.shape), generator=gen).double() * 2 - 1
        inputs = interleave(x1, x2)
        inputs_adv = pgd_contrastive(model, inputs, interleave(uniform[0], uniform[1]), iters=pgd_iter)
        with torch.no_grad():
            features_adv_before_fc = get_feature(model, inputs_adv, "pgd")
            features_before_fc = get_feature(model, inputs, "normal")
        features = linear_layer(features_before_fc, "normal")
        features_adv = linear_layer(features_adv_before_fc, "pgd")
        batch_loss = (nt_xent(features) + nt_xent(features_adv)) / 2
        grads = torch.autograd.grad(batch_loss, fc_params(linear_layer))
        per_batch_ori_grads.append([g.detach() for g in grads])
        per_batch_grads.append(torch.cat([g.detach().mean(dim=0).view(1, -1) for g in grads], dim=1))
    per_batch_grads = torch.cat(per_batch_grads, dim=0)
    index_list = torch.arange(len(batches))
    batch_num = int(int(len(images) * fraction) / batch_size)
    subset_index, gains = [], []
    for j in range(batch_num):
        gain = torch.matmul(per_batch_grads[index_list], grad_val.reshape(-1, 1)).squeeze(1)
        r = torch.argmax(gain, dim=0)
        gains.append(gain)
        subset_index.extend(batches[index_list[r]].tolist())
        if j == batch_num - 1:
            break
        g = per_batch_ori_grads[index_list[r]]
        with torch.no_grad():
            for _ in range(2):  # linear_layer.fcN... then self.model.fc.fcN...: the same module
                linear_layer.fc1.weight.data = linear_layer.fc1.weight.data - lr * g[0]
                linear_layer.fc1.bias.data = linear_layer.fc1.bias.data - lr * g[1]
                linear_layer.fc2.weight.data = linear_layer.fc2.weight.data - lr * g[2]
                linear_layer.fc3.weight.data = linear_layer.fc3.weight.data - lr * g[3]
        grad_val = valid_grad(model, val, gen, batch_size)
        index_list = torch.cat([index_list[:r], index_list[r + 1:]])
    linear_layer.load_state_dict(ori)
    return subset_index, gains, first_grad_val.flatten()
