"""The sensitivity table a search starts from, and the mixed-precision seeds drawn from it.

Each module group is quantized alone at each width the space offers (the other groups stay float)
and the model's perplexity measured on the first `seeds.sensitivity.tokens` evaluation tokens. Groups
are measured by parallel Ray tasks, one per group; the table is kept in the store's cache under a
key of the model, the tokens, the probes and the calibration statistics, so a later search reuses it.

A seed then takes, for each share of the budget, the widths that minimise linear-layer bytes while
the groups' log-perplexity changes, added up, stay within that share of the budget's: an exact
multiple-choice knapsack over the groups, on costs rounded to a thousandth of the target.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch

from cluster.errors import UserError
from cluster.store import Store
from jobs.compress.recipe import apply_recipe
from jobs.compress.stats_cache import KIND, entry_name, model_identity
from jobs.eval.perplexity import perplexity
from jobs.eval.size import linear_bytes
from jobs.models.load import load_causal_lm, open_model
from jobs.search.config import SearchConfig
from jobs.search.render import Candidate, render_recipe
from jobs.search.shared import load_statistics
from jobs.search.space import HEAD, Choices, ModuleGroup

TABLE_FILE = "sensitivity.json"
FORMAT_VERSION = 1
COST_BINS = 1000


@dataclass(frozen=True)
class Probe:
    """One group quantized alone: bits, group size (None: per row) and method."""

    group: str
    bits: int
    group_size: int | None
    method: str


def probes_for(config: SearchConfig, found: Choices, groups: list[ModuleGroup]) -> list[Probe]:
    """Every width the seed may give a group, each at every group size the space has (8 bits per row
    when it may): the knapsack can only choose a size it has a cost for."""
    space, method = config.space, "gptq" if "gptq" in config.space.quant_method else "rtn"
    widths = config.seeds.sensitivity.bits or [b for b in space.bits if b is not None]
    sizes = sorted(g for g in space.group_size if g is not None)
    per_group_size = "group_size" in space.per_group
    probes = []
    for group in groups:
        if group.name == HEAD:
            probes += [Probe(HEAD, b, None, method) for b in space.head_bits if b in widths]
            continue
        for bits in widths:
            probes += [Probe(group.name, bits, size, method) for size in probe_sizes(bits, sizes, space.group_size,
                                                                                       per_group_size)]
    return probes


def probe_sizes(bits: int, sizes: list[int], choices: list[int | None], per_group: bool) -> list[int | None]:
    if not sizes:
        return [None]
    if not per_group:  # one size for every group: the coarsest
        return [sizes[-1]]
    if bits == 8 and None in choices:
        return [None]
    return sorted(sizes, reverse=True)


def point_for(found: Choices, widths: dict[str, tuple[int, int | None]], method: str) -> dict:
    """The point quantizing each group in `widths` as given and leaving the rest float, unpruned and
    unfactored; a UserError when the space cannot express it."""
    sizes = {size for _, size in widths.values()}
    point: dict[str, dict] = {}
    for group, knob in found.varying():
        if knob == "bits":
            value = widths.get(group, (None, None))[0]
        elif knob == "group_size":
            value = widths[group][1] if group in widths else next(iter(sizes), found.knobs[(group, knob)][0])
        elif knob == "sparsity":
            value = 0.0
        elif knob == "lowrank_energy":
            value = 1.0
        elif knob == "quant_method":
            value = method
        else:  # pattern, prune_method: nothing is pruned, any choice renders alike
            value = found.knobs[(group, knob)][0]
        if not expressible(found, (group, knob), value):
            raise UserError(f"seeds.sensitivity needs {knob} {value} in the space for {group}")
        point.setdefault(group, {})[knob] = value
    return point


def expressible(found: Choices, key: tuple[str, str], value) -> bool:
    if key in found.ranges:
        low, high, _ = found.ranges[key]
        return low - 1e-9 <= value <= high + 1e-9
    return value in found.knobs[key]


def check_seedable(config: SearchConfig, found: Choices, groups: list[ModuleGroup]) -> None:
    """Before any Ray work: the space must let each group take its own width, and render every probe."""
    if config.seeds.sensitivity is None:
        return
    if "bits" not in config.space.per_group:
        raise UserError("seeds.sensitivity mixes widths across groups; add bits to space.per_group")
    if None not in config.space.bits:
        raise UserError("seeds.sensitivity quantizes each group alone, the others float; add null to space.bits")
    if config.seeds.sensitivity.tokens > config.eval.tokens:
        raise UserError(f"seeds.sensitivity.tokens {config.seeds.sensitivity.tokens} is more than eval.tokens "
                        f"{config.eval.tokens}")
    probes = probes_for(config, found, groups)
    if not probes:
        raise UserError("seeds.sensitivity has no width to probe: its bits are not among the space's")
    for probe in probes:
        point_for(found, {probe.group: (probe.bits, probe.group_size)}, probe.method)


@dataclass
class ProbeContext:
    config: SearchConfig
    groups: list[ModuleGroup]
    found: Choices
    model_path: str
    store_uri: str
    tokens: torch.Tensor
    stats_entry: str | None

    def recipe(self, probe: Probe):
        point = point_for(self.found, {probe.group: (probe.bits, probe.group_size)}, probe.method)
        return render_recipe(Candidate.of(point, self.found, self.groups), self.groups,
                             self.config.calibration, "sensitivity")


@ray.remote
def measure_group(context: ProbeContext, probes: list[Probe]) -> list[dict]:
    """One group's probes, each on a fresh copy of the model, against the model as it came. Probes that
    render alike (a group size some layers cannot take is fitted to one they can) are measured once."""
    config = context.config
    torch.set_num_threads(max(1, int(config.resources_per_trial.cpu)))
    model = load_causal_lm(Path(context.model_path))
    window, batch = config.eval.window, config.eval.batch_size
    baseline = perplexity(model, context.tokens, window, batch).ppl
    baseline_bytes = linear_bytes(model)
    rows, measured = [], {}
    for probe in probes:
        recipe = context.recipe(probe)
        steps = json.dumps(recipe.model_dump(mode="json", include={"steps"}), sort_keys=True)
        if steps in measured:
            rows.append({**measured[steps], **asdict(probe)})
            continue
        compressed = copy.deepcopy(model)
        stats = load_statistics(context.store_uri, context.stats_entry, compressed, recipe)
        apply_recipe(compressed, recipe, None, progress=False, stats=stats)
        ppl = perplexity(compressed, context.tokens, window, batch).ppl
        measured[steps] = {**asdict(probe), "ppl": ppl, "baseline_ppl": baseline,
                           "log_ratio": math.log(ppl / baseline), "bytes_saved": baseline_bytes - linear_bytes(compressed)}
        rows.append(measured[steps])
        del compressed
    return rows


def table_entry(context: ProbeContext, probes: list[Probe], store: Store) -> tuple[str, str]:
    """(cache artifact name, full key): what the numbers depend on, hashed."""
    model = open_model(context.config.model, store)
    identity = {"format": FORMAT_VERSION, "model": model_identity(model),
                "tokens": hashlib.sha256(context.tokens.numpy().tobytes()).hexdigest(),
                "window": context.config.eval.window, "batch_size": context.config.eval.batch_size,
                "statistics": context.stats_entry, "probes": [asdict(p) for p in probes],
                "recipes": [context.recipe(p).model_dump(mode="json", exclude={"name", "description"})
                            for p in probes]}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return entry_name(model.name, key, "sensitivity"), key


def sensitivity_table(context: ProbeContext, store: Store) -> list[dict]:
    """The table, from the store's cache or measured now by one Ray task per group (and then cached)."""
    probes = probes_for(context.config, context.found, context.groups)
    name, key = table_entry(context, probes, store)
    if (cached := store.get(KIND, name)) is not None and cached.manifest.get("key") == key:
        print(f"sensitivity: reusing stored {KIND} '{name}'", flush=True)
        return json.loads(cached.read_text(TABLE_FILE))
    by_group: dict[str, list[Probe]] = {}
    for probe in probes:
        by_group.setdefault(probe.group, []).append(probe)
    print(f"sensitivity: {len(probes)} probes of {len(by_group)} groups as parallel Ray tasks", flush=True)
    shared = ray.put(context)
    cpus = context.config.resources_per_trial.cpu
    tasks = [measure_group.options(num_cpus=cpus).remote(shared, group_probes) for group_probes in by_group.values()]
    rows = [row for group_rows in ray.get(tasks) for row in group_rows]
    with tempfile.TemporaryDirectory(prefix="rayfoundry-sensitivity-") as tmp:
        (Path(tmp) / TABLE_FILE).write_text(json.dumps(rows, indent=1))
        store.put_dir(KIND, name, Path(tmp), {"source": context.config.model, "format": "sensitivity-table",
                                              "key": key, "recreate": f"rayfoundry cache rm {name}"})
    return rows


def cheapest_within(rows: list[dict], budget_log_ratio: float) -> dict[str, dict]:
    """The probe per group (absent: float) that saves the most bytes with the summed log-perplexity
    change at most `budget_log_ratio`; exact over costs rounded up to 1/COST_BINS of it."""
    if budget_log_ratio <= 0:
        return {}
    unit = budget_log_ratio / COST_BINS
    by_group: dict[str, list[dict]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    best: dict[int, tuple[float, dict[str, dict]]] = {0: (0.0, {})}  # cost bins -> (bytes saved, picks)
    for group, options in by_group.items():
        grown = dict(best)
        for used, (saved, picks) in best.items():
            for row in options:
                cost = used + math.ceil(max(row["log_ratio"], 0.0) / unit - 1e-9)
                total = saved + row["bytes_saved"]
                if cost <= COST_BINS and total > grown.get(cost, (-1.0, None))[0]:
                    grown[cost] = (total, {**picks, group: row})
        best = grown
    return max(best.values(), key=lambda entry: entry[0])[1]


def mixed_seeds(rows: list[dict], shares: list[float], limit_ratio: float,
                found: Choices) -> list[tuple[str, dict, dict[str, dict]]]:
    """(seed name, point, picks) for each share of the budget that quantizes something."""
    seeds = []
    for share in shares:
        picks = cheapest_within(rows, share * math.log(limit_ratio))
        if picks:
            method = next(iter(picks.values()))["method"]
            point = point_for(found, {g: (r["bits"], r["group_size"]) for g, r in picks.items()}, method)
            seeds.append((f"sensitivity-{share:g}", point, picks))
    return seeds


def markdown_rows(rows: list[dict]) -> list[dict]:
    return [{"group": r["group"], "width": f"int{r['bits']}" + (f"-g{r['group_size']}" if r["group_size"] else ""),
             "method": r["method"], "ppl": r["ppl"], "ppl_change": math.exp(r["log_ratio"]) - 1,
             "MiB_saved": r["bytes_saved"] / 2**20} for r in rows]



def sensitivity_seeds(context: ProbeContext, limit_ratio: float, known: dict[str, str],
                      store: Store) -> tuple[list[dict], list[dict], dict[str, str]]:
    """(the table, the seeds' points, rendered recipe name -> seed name) for the mixed seeds that
    render unlike every seed in `known`."""
    config = context.config
    rows = sensitivity_table(context, store)
    points, names = [], {}
    for name, point, picks in mixed_seeds(rows, config.seeds.sensitivity.shares, limit_ratio, context.found):
        rendered = render_recipe(Candidate.of(point, context.found, context.groups), context.groups,
                                 config.calibration, config.name).name
        widths = ", ".join(f"{g} int{r['bits']}" + (f"-g{r['group_size']}" if r["group_size"] else "")
                           for g, r in sorted(picks.items()))
        if rendered in known or rendered in names:
            print(f"sensitivity: seed {name} ({widths}) renders as {(known | names)[rendered]}, not added", flush=True)
            continue
        print(f"sensitivity: seed {name}: {widths}", flush=True)
        points.append(point)
        names[rendered] = name
    return rows, points, names
