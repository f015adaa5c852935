"""Eval points: loss and accuracy of each split, the NC metrics, and the label-noise and
minority-class measurements, summed over the ranks of a distributed run."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ncsweep import distributed
from ncsweep.data import DataBundle, Split, batches
from ncsweep.nc import HeldOutNC4, NCAccumulator
from ncsweep.nc.blocks import Block
from ncsweep.nc.depth import DepthProbe

Row = dict[str, float]
F64 = torch.float64
Measure = Callable[[nn.Module, nn.Module, DataBundle, int, int, float], Row]
"""An eval row of (model, loss, data, epoch, step, lr): ``Trainer.measure``."""


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, data: DataBundle, eval_batch_size: int,
             max_feature_bytes: int, blocks: Sequence[Block] = ()) -> Row:
    """Train/test loss and accuracy, the NC metrics of the train features, and ``nc4_test``.

    With ``blocks`` (``ncsweep.nc.blocks.select_blocks``): every block's ``layers/<block>/...``
    keys and the data-separation fit (``ncsweep.nc.layers``), from forward hooks on the same
    passes; the blocks' kept train features have a budget of their own, ``max_feature_bytes``.

    Under label noise or random labels (``Split.clean_labels`` set), from the same passes:
    every NC key against the clean labels (suffix ``_clean``, ``nc4_test_clean`` included),
    ``train_acc_clean`` (argmax of W h + b against the clean labels) and ``memorization`` (of
    the train samples whose label differs from the clean one, the share predicted as that
    noisy label; left out when no label differs). The clean-label NC state is a second
    accumulator, and the two share ``max_feature_bytes``. With minority classes
    (``DataBundle.minority_classes``, set by an imbalance): ``minority_collapse`` (the mean
    cosine over the pairs k < l of minority rows w_k, w_l of W; left out with fewer than two
    minority classes), ``test_acc_class_<k>`` for every class k with test samples and
    ``test_acc_minority``, ``test_acc_majority`` (accuracy over the test samples of those
    classes).
    """
    was_training = model.training
    model.eval()
    distributed.broadcast_buffers(model)
    with DepthProbe(blocks, data.num_classes, max_feature_bytes) as depth:
        row = _passes(model, loss_fn, data, eval_batch_size, max_feature_bytes, depth)
    model.train(was_training)
    return row


def _passes(model: nn.Module, loss_fn: nn.Module, data: DataBundle, eval_batch_size: int,
            max_feature_bytes: int, depth: DepthProbe) -> Row:
    """The eval passes of :func:`evaluate`, the block outputs going to ``depth``."""
    train = _shard(data.train)
    budget = max_feature_bytes // 2 if train.clean_labels is not None else max_feature_bytes
    accumulator = NCAccumulator(data.num_classes, max_feature_bytes=budget)
    clean = NCAccumulator(data.num_classes, max_feature_bytes=budget) \
        if train.clean_labels is not None else None
    row = _split_metrics(model, loss_fn, train, eval_batch_size, "train", accumulator,
                         clean=clean, depth=depth)
    for acc in (accumulator, clean):
        if acc is not None:
            acc.all_reduce()
    depth.reduce()
    weight, bias = model.head.weight, model.head.bias
    pending = [(acc, labels) for acc, labels in ((accumulator, train.labels),
                                                 (clean, train.clean_labels))
               if acc is not None and acc.needs_second_pass]
    second = depth.needs_second_pass
    if pending or second:
        start = 0
        for x, y in batches(train, eval_batch_size):
            depth.before(y, "second" if second else "none")
            features = model.backbone(x)
            depth.after(features)
            for acc, labels in pending:
                acc.update_predictions(features, labels[start:start + y.numel()], weight, bias)
            start += y.numel()
    row.update(accumulator.compute(weight, bias))
    if clean is not None:
        row.update({f"{key}_clean": value for key, value in clean.compute(weight, bias).items()})
    minority = data.minority_classes
    if data.test is not None:
        heldout = [HeldOutNC4(acc, weight, bias) for acc in (accumulator, clean)
                   if acc is not None]
        row.update(_split_metrics(model, loss_fn, _shard(data.test), eval_batch_size, "test",
                                  heldout=heldout, minority=minority, depth=depth))
        row["nc4_test"] = heldout[0].compute()
        if clean is not None:
            row["nc4_test_clean"] = heldout[1].compute()
    if minority is not None and len(minority) >= 2:
        row["minority_collapse"] = minority_collapse(weight, minority)
    head = {key: row[key] for key in ("nc1", "cdnv", "trace_ratio")}
    head["ncc_acc_train"] = accumulator.nearest_centre_accuracy()
    if data.test is not None:
        head["ncc_acc_test"] = heldout[0].nearest_centre_accuracy()
    row.update(depth.compute(head))
    return row


def _shard(split: Split) -> Split:
    """This rank's contiguous share of a split for an eval pass (the whole split on one rank)."""
    return split.part(distributed.shard(len(split))) if distributed.is_distributed() else split


def minority_collapse(weight: torch.Tensor, minority: Sequence[int]) -> float:
    """Mean pairwise cosine of the minority classes' classifier rows (1: collapsed, Fang et al.)."""
    rows = weight.detach()[torch.as_tensor(list(minority), device=weight.device)].double()
    unit = rows / rows.norm(dim=1, keepdim=True)
    cosines = unit @ unit.T
    pairs = torch.triu_indices(len(minority), len(minority), offset=1, device=weight.device)
    return cosines[pairs[0], pairs[1]].mean().item()


def _split_metrics(model: nn.Module, loss_fn: nn.Module, split: Split, eval_batch_size: int,
                   prefix: str, accumulator: NCAccumulator | None = None,
                   heldout: Sequence[HeldOutNC4] = (), clean: NCAccumulator | None = None,
                   minority: Sequence[int] | None = None, depth: DepthProbe | None = None
                   ) -> Row:
    """Loss and accuracy of one split; the clean-label and per-class tallies where asked;
    the block outputs of each forward pass to ``depth``, in the pass named ``prefix``.

    On several ranks each passes its shard and the tallies are summed over the ranks.
    """
    device = split.labels.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    noisy = split.clean_labels is not None
    tally = torch.zeros(3, dtype=torch.long, device=device)  # clean-correct, flipped, memorised
    k = model.head.weight.shape[0]
    per_class = torch.zeros((2, k), dtype=torch.long, device=device)  # correct, count
    start = 0
    last = (len(split) - 1) // (eval_batch_size or max(len(split), 1))  # the last batch's index
    for index, (x, y) in enumerate(batches(split, eval_batch_size)):
        if depth is not None:
            depth.before(y, prefix, last=index == last)
        features, logits = model.features_and_logits(x)
        if depth is not None:
            depth.after(features)
        predicted = logits.argmax(dim=1)
        if accumulator is not None:
            accumulator.update(features, y)
        for held in heldout:
            held.update(features, y)
        loss_sum += loss_fn(logits, y).double() * y.numel()
        hit = predicted == y
        correct += hit.sum()
        if noisy:
            true = split.clean_labels[start:start + y.numel()]
            if clean is not None:
                clean.update(features, true)
            flipped = y != true
            tally += torch.stack([(predicted == true).sum(), flipped.sum(),
                                  (flipped & hit).sum()])
        if minority is not None:
            per_class[0] += torch.bincount(y[hit], minlength=k)
            per_class[1] += torch.bincount(y, minlength=k)
        start += y.numel()
    sums = distributed.all_reduce_sum(torch.cat([
        torch.stack([loss_sum, correct.double(), torch.tensor(float(len(split)), dtype=F64,
                                                               device=device)]),
        tally.double(), per_class.double().flatten()]))
    loss_total, correct_total, count = sums[:3].tolist()
    tally = sums[3:6].long()
    per_class = sums[6:].long().view(2, k)
    n = int(count)
    row = {f"{prefix}_loss": loss_total / n, f"{prefix}_acc": correct_total / n}
    if noisy:
        clean_correct, flipped, memorised = tally.tolist()
        row[f"{prefix}_acc_clean"] = clean_correct / n
        if flipped:
            row["memorization"] = memorised / flipped
    if minority is not None:
        row.update(_class_accuracies(prefix, per_class.tolist(), minority))
    return row


def _class_accuracies(prefix: str, per_class: list[list[int]], minority: Sequence[int]) -> Row:
    """``<prefix>_acc_class_<k>`` per class with samples, and over minority and majority."""
    correct, count = per_class
    pairs = enumerate(zip(correct, count, strict=True))
    row = {f"{prefix}_acc_class_{k}": c / n for k, (c, n) in pairs if n}
    groups = {"minority": set(minority), "majority": set(range(len(count))) - set(minority)}
    for name, classes in groups.items():
        total = sum(count[k] for k in classes)
        if total:
            row[f"{prefix}_acc_{name}"] = sum(correct[k] for k in classes) / total
    return row
