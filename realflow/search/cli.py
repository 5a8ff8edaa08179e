"""`python -m realflow.search EXPERIMENT cluster=<name or yaml> [key=value ...]`.

parse -> build the experiment's config and DFG -> the search problem (models, lengths, cluster)
-> baselines and the search -> simulate the winners through the real master -> print the
table -> write plan.yaml (the allocation, plus the experiment keys given) and, on request, the
best plan's simulated trace.json.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from realflow.api.config import ConfigError, apply_overrides, field_, leaf_paths, parse_override
from realflow.api.registry import EXPERIMENTS, closest

logger = logging.getLogger(__name__)
EXIT_USAGE = 2


@dataclasses.dataclass
class SearchConfig:
    """The search's own keys; every other key=value sets the experiment's config."""

    cluster: str = field_("", "A shipped cluster (h100x8, h200x8, a100x8, pcie8, cpu2) or a YAML.")
    nodes: int = field_(0, "Nodes of the cluster (0: as its file says).", ge=0)
    models: dict[str, str] = field_(
        {},
        "Model of each role: a preset (llama-7b, llama-70b, ...), builtin:<name> or an HF "
        "directory; default: the experiment's <role>.path. 'none': a role without weights.",
    )
    prompt_len: int = field_(0, "Prompt tokens per sequence (0: dataset.max_length).", ge=0)
    gen_len: int = field_(0, "Answer tokens (0: the experiment's gen.max_new_tokens).", ge=0)
    budget_s: float = field_(30.0, "Seconds the search may take.", gt=0.0)
    search_seed: int = field_(0, "Seed of the MCMC.")
    out: str = field_("plan.yaml", "Where to write the allocation of the best plan.")
    trace: str = field_("", "Write the best plan's simulated trace.json here (empty: no).")
    sim_steps: int = field_(4, "Steps the simulator runs.", gt=1)


USAGE = """usage: python -m realflow.search EXPERIMENT cluster=<name or yaml> [key=value ...]

  search keys: {keys}
  any other key=value sets the experiment's config (e.g. n_seqs=512 ppo.ppo_n_minibatches=4)
"""


def _split(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    own = {k.split(".")[0] for k in leaf_paths(SearchConfig)} | {"models"}
    positional, mine, theirs = [], [], []
    for arg in argv:
        if "=" not in arg:
            positional.append(arg)
            continue
        key, _ = parse_override(arg)
        (mine if key.split(".")[0] in own else theirs).append(arg)
    return positional, mine, theirs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keys = ", ".join(sorted(k.split(".")[0] for k in leaf_paths(SearchConfig)))
    positional, mine, theirs = _split(argv)
    if positional[:1] in (["-h"], ["--help"]):
        print(USAGE.format(keys=keys))
        return 0
    if len(positional) != 1:
        print(USAGE.format(keys=keys), file=sys.stderr)
        return EXIT_USAGE
    name = positional[0]
    if name not in EXPERIMENTS:
        guess = closest(name, EXPERIMENTS.names())
        hint = f"; did you mean '{guess}'?" if guess else ""
        print(f"error: unknown experiment '{name}'{hint}", file=sys.stderr)
        return EXIT_USAGE
    try:
        scfg = apply_overrides(SearchConfig, mine)
        cfg = apply_overrides(EXPERIMENTS.get(name), theirs)
        if not scfg.cluster:
            raise ConfigError(["cluster: name a cluster (e.g. cluster=h100x8) or a YAML file"])
        problem, dfg = build_problem(cfg, scfg)
    except (ConfigError, ValueError) as e:
        problems = e.problems if isinstance(e, ConfigError) else [str(e)]
        print(f"error: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return EXIT_USAGE
    return run(name, cfg, scfg, problem, dfg, argv, theirs)


def build_problem(cfg: Any, scfg: SearchConfig) -> tuple[Any, Any]:
    """The search problem of an experiment config: its DFG, role models, lengths, cluster."""
    from realflow.search.plan import problem_from_dfg
    from realflow.search.spec import load_cluster, model_spec

    if cfg.weight_copies() or cfg.max_staleness():
        raise ValueError(
            "the search plans on-policy graphs; this config has weight copies "
            f"({cfg.weight_copies()}) / max_staleness {cfg.max_staleness()}: turn async off"
        )
    cluster = load_cluster(scfg.cluster)
    if scfg.nodes:
        cluster = cluster.with_nodes(scfg.nodes)
    cfg = cfg.with_role_defaults()
    roles = cfg.roles()
    unknown = sorted(set(scfg.models) - set(roles))
    if unknown:
        raise ValueError(f"models: unknown roles {unknown}; this experiment's are {sorted(roles)}")
    models = {}
    for role, r in roles.items():
        source = scfg.models.get(role, "none" if r.head == "none" else r.config.path)
        models[role] = None if source == "none" else model_spec(source)
    hyper = _hyperparameters(cfg)
    gen_len = scfg.gen_len or _gen_len(hyper)
    prompt_len = scfg.prompt_len or cfg.dataset.max_length
    group = getattr(hyper, "group_size", 1)
    dfg = cfg.dfg()
    if group > 1:  # every call after the rollout reads group_size answers per prompt
        import copy

        dfg = copy.deepcopy(dfg)
        for m in dfg.mfcs:
            m.n_seqs *= group
    problem = problem_from_dfg(
        dfg, models, cluster, prompt_len, gen_len, cfg.optimizer_steps_per_train_call(),
        any(r.config.gradient_checkpointing for r in roles.values()),
    )  # fmt: skip
    return problem, dfg


def _hyperparameters(cfg: Any) -> Any:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if hasattr(value, "gen") and hasattr(value.gen, "max_new_tokens"):
            return value
    return None


def _gen_len(hyper: Any) -> int:
    return hyper.gen.max_new_tokens if hyper is not None else 0


def run(name: str, cfg: Any, scfg: SearchConfig, problem: Any, dfg: Any, argv: list[str],
        overrides: list[str]) -> int:  # fmt: skip
    from realflow.search import search
    from realflow.search.simulate import simulate, write_trace

    t0 = time.perf_counter()
    results = search.baselines(problem)
    best = search.search(problem, budget_s=scfg.budget_s, seed=scfg.search_seed)
    results.append(best)
    c = problem.cluster
    print(f"{name} on {c.name}: {c.nodes} node(s) x {c.devices_per_node} {c.device.name} "
          f"({c.device.source.split(':')[0]} profile); searched for {best.seconds:.1f} s "
          f"({best.cpu_s:.1f} s CPU, {best.evaluations} plans scored), best found after {best.found_at_s:.1f} s")  # fmt: skip
    print(f"\n{'plan':<40}{'step s (sim)':>14}{'peak GB/device':>16}")
    sims = {}
    for r in results:
        if r.step_time_s == search.INF:
            print(f"{r.name:<40}{'no plan fits memory':>30}")
            continue
        sims[r.name] = sim = simulate(problem, r.plan, dfg, scfg.sim_steps)
        peak = max(sim.peak_memory.values()) / 1e9
        print(f"{r.name:<40}{sim.step_time_s:>14.3f}{peak:>16.1f}")
    if best.step_time_s == search.INF:
        print("error: no plan fits in memory on this cluster", file=sys.stderr)
        return 1
    print(f"\nbest plan ({best.name}):")
    _print_plan(problem, best.plan, sims[best.name])
    write_plan(scfg.out, best.plan, problem, sims[best.name].step_time_s, argv, overrides)
    print(f"\nwrote {scfg.out}: python -m realflow.quickstart {name} --config {scfg.out}")
    if scfg.trace:
        write_trace(sims[best.name], scfg.trace, c.n_devices)
        print(f"wrote {scfg.trace} (open in https://ui.perfetto.dev)")
    logger.debug("total %.1f s", time.perf_counter() - t0)
    return 0


def _print_plan(problem: Any, plan: dict, sim: Any) -> None:
    from realflow.search.plan import describe

    print(f"  {'mfc':<16}{'allocation':<22}{'call s':>10}{'realloc s':>11}")
    for row in describe(problem, plan):
        if problem.by_name[row["mfc"]].model is None:
            continue
        print(f"  {row['mfc']:<16}{row['allocation']:<22}{row['call_s']:>10.3f}"
              f"{row['realloc_s']:>11.3f}")  # fmt: skip
    print("  peak memory per device (GB), utilisation after step 1:")
    segments = problem.memory_segments(plan)
    for lo, hi, b in segments:
        util = sum(sim.utilisation[d] for d in range(lo, hi)) / (hi - lo)
        devs = f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"
        print(f"    devices {devs:<10}{b / 1e9:>8.2f} GB{util * 100:>8.0f}% busy")


def write_plan(path: str, plan: dict, problem: Any, step_s: float, argv: list[str],
               overrides: list[str]) -> None:  # fmt: skip
    """plan.yaml: `allocation: {mfc: "<layout>@<workers>"}` for every MFC (a weightless one,
    e.g. a rule-based reward, pinned to device 0: a mesh allocation names every MFC) and the
    experiment keys the search was given, so a run uses the same batch and models."""
    import yaml
    from omegaconf import OmegaConf

    alloc = {t.name: str(plan[t.name]) for t in problem.tasks}
    keys = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))) if overrides else {}
    if problem.cluster.n_devices > 1:  # several workers form a process group: Ray's
        keys.setdefault("mode", "ray")
    header = (
        f"# python -m realflow.search {' '.join(argv)}\n"
        f"# predicted step time {step_s:.3f} s on {problem.cluster.name} "
        f"({problem.cluster.n_devices} devices)\n"
    )
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump({**keys, "allocation": alloc}, f, sort_keys=False)
