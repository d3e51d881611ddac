"""Gradual pruning on the cubic schedule, and lottery tickets by iterative pruning with rewind."""
import pytest
import torch
from torch import nn

from jobs.compress.gradual import GradualPruner, cubic_sparsity
from jobs.compress.lottery import apply_masks, find_ticket


def tiny_task(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 16)
    y = x[:, :4] * 2 - x[:, 4:8]
    return model, x, y


def test_the_cubic_schedule_rises_fast_then_slowly():
    values = [cubic_sparsity(t, 0.0, 0.8, 10, 110) for t in range(0, 130, 10)]
    assert values[0] == values[1] == 0.0 and values[-1] == values[-2] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[2] - values[1] > values[-3] - values[-4]  # early steps are the big ones
    assert cubic_sparsity(60, 0.0, 0.8, 10, 110) == pytest.approx(0.8 * (1 - 0.5**3))
    with pytest.raises(ValueError):
        cubic_sparsity(0, 0.5, 0.2, 0, 10)


def test_training_with_a_gradual_pruner_ends_at_the_sparsity_with_pruned_weights_zero():
    model, x, y = tiny_task()
    pruner = GradualPruner(model, final_sparsity=0.75, start=5, end=45, every=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(60):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        pruner.step(step)
        for name, linear in pruner.layers.items():
            assert (linear.weight[~pruner.masks[name]] == 0).all()
    for linear in pruner.layers.values():
        assert (linear.weight == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)


def train_for(steps: int, x, y, log: list | None = None):
    def train(model, masks):
        if log is not None:
            log.append({name: model.get_submodule(name).weight.detach().clone() for name in masks})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            apply_masks(model, masks)
        return loss.item()
    return train


def test_a_ticket_prunes_geometrically_rewinds_survivors_and_keeps_masks_nested():
    model, x, y = tiny_task()
    initial = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    entries, masks_seen = [], []

    def train(model, masks):
        masks_seen.append({n: m.clone() for n, m in masks.items()})
        return train_for(20, x, y, entries)(model, masks)

    ticket = find_ticket(model, train, rounds=3, prune_fraction=0.5)
    sparsities = [r["sparsity"] for r in ticket.rounds]
    assert sparsities[0] == 0 and sparsities[1:] == pytest.approx([0.5, 0.75, 0.875], abs=0.01)
    for before, after in zip(masks_seen, masks_seen[1:]):
        assert all((after[n] <= before[n]).all() for n in before)  # once pruned, never back
    for weights, masks in zip(entries[1:], masks_seen[1:]):  # every round starts from the rewind point
        for name, weight in weights.items():
            assert torch.equal(weight, initial[name] * masks[name])
    for name, mask in ticket.masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all()


def test_bad_ticket_settings_are_refused():
    model, x, y = tiny_task()
    with pytest.raises(ValueError, match="prune_fraction"):
        find_ticket(model, train_for(1, x, y), rounds=2, prune_fraction=1.0)
