"""The command line: `python -m realflow.quickstart EXP [key=value ...] [--config FILE.yaml]
[--dry-run [--json]] [--help]`.

parse -> load plugins -> find the experiment -> apply presets and overrides (strictly) ->
compile the DFG -> print it (--dry-run) or run it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

from realflow.api.config import (
    ConfigError,
    apply_overrides,
    describe_fields,
    parse_override,
    to_dict,
)
from realflow.api.dfg import DFGError
from realflow.api.registry import EXPERIMENTS, RegistryError, closest, load_plugins
from realflow.api.tracebacks import user_frames
from realflow.experiments.allocation import mesh_plan, uses_meshes

USAGE = """usage: python -m realflow.quickstart EXPERIMENT [key=value ...] [--config FILE.yaml]
                                   [--dry-run [--json]] [--help]

  EXPERIMENT       a registered experiment ({names})
  key=value        set a config key (dotted path, e.g. ppo.kl_ctl=0.05 actor.path=/ckpt)
  --config FILE    apply a YAML preset first (repeatable); key=value wins over it
  --dry-run        resolve the config, compile the dataflow graph, print them and exit
  --json           with --dry-run: print one JSON object {{"config": ..., "dfg": ...}}
  --help           after EXPERIMENT: list its keys with types, defaults and docs
  plugins=[a.py,m] import your modules first (they may register experiments, interfaces...)
"""

EXIT_USAGE = 2


class UsageError(Exception):
    pass


def _split_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str], set[str]]:
    positional, overrides, presets, flags = [], [], [], set()
    it = iter(argv)
    for arg in it:
        if arg in ("--dry-run", "--json", "--help", "-h"):
            flags.add("--help" if arg == "-h" else arg)
        elif arg == "--config":
            value = next(it, None)
            if value is None:
                raise UsageError("--config needs a YAML file")
            presets.append(value)
        elif arg.startswith("--config="):
            presets.append(arg.partition("=")[2])
        elif arg.startswith("--"):
            raise UsageError(f"unknown option '{arg}'")
        elif "=" in arg:
            overrides.append(arg)
        else:
            positional.append(arg)
    return positional, overrides, presets, flags


def _plugin_specs(overrides: Sequence[str], presets: Sequence[str]) -> list[str]:
    """`plugins` of the YAML presets, then of the command line: they load before validation."""
    from omegaconf import OmegaConf

    specs: list[str] = []
    for preset in presets:
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(preset))
        except Exception:  # apply_overrides reports an unreadable preset with the other problems
            continue
        plugins = loaded.get("plugins") if isinstance(loaded, dict) else None
        if isinstance(plugins, list):
            specs.extend(str(p) for p in plugins)
    for item in overrides:
        key, value = parse_override(item)
        if key == "plugins":
            specs.extend(v.strip() for v in value.strip("[]").split(",") if v.strip())
    return specs


def _usage(extra: str = "") -> str:
    names = ", ".join(EXPERIMENTS.names())
    return (extra + "\n\n" if extra else "") + USAGE.format(names=names)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        positional, overrides, presets, flags = _split_args(argv)
        load_plugins(_plugin_specs(overrides, presets))
    except (UsageError, ConfigError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        frames = user_frames(getattr(e, "traceback_text", ""))
        if frames:
            print("in your code (most recent call last):\n" + "\n".join(frames), file=sys.stderr)
        return EXIT_USAGE
    if not positional:
        stream = sys.stdout if "--help" in flags else sys.stderr
        print(_usage("" if "--help" in flags else "error: name an experiment"), file=stream)
        return 0 if "--help" in flags else EXIT_USAGE
    if len(positional) > 1:
        print(_usage(f"error: one experiment at a time, got {positional}"), file=sys.stderr)
        return EXIT_USAGE
    name = positional[0]
    if name not in EXPERIMENTS:
        guess = closest(name, EXPERIMENTS.names())
        hint = f" Did you mean '{guess}'?" if guess else ""
        print(_usage(f"error: unknown experiment '{name}'.{hint}"), file=sys.stderr)
        return EXIT_USAGE
    cls = EXPERIMENTS.get(name)
    if "--help" in flags:
        print(f"{name}: {(cls.__doc__ or '').strip()}\n\nkeys:\n{describe_fields(cls)}")
        return 0
    try:
        cfg = apply_overrides(cls, overrides, presets)
        dfg = cfg.dfg()
    except (ConfigError, DFGError, RegistryError) as e:
        problems = e.problems if isinstance(e, ConfigError) else [str(e)]
        print(f"error: invalid config for '{name}' ({len(problems)} problem(s)):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        print(
            f"Run 'python -m realflow.quickstart {name} --help' to list the keys.", file=sys.stderr
        )
        return EXIT_USAGE
    if "--dry-run" in flags:
        if "--json" in flags:
            print(json.dumps({"config": to_dict(cfg), "dfg": dfg.to_json()}, indent=2))
        else:
            print(f"experiment: {name}\nconfig:\n{_yaml(cfg)}\ndataflow graph:\n{dfg.summary()}")
            if uses_meshes(cfg.allocation):
                from realflow.system.mesh import describe_allocation

                print(f"allocation:\n{describe_allocation(cfg, mesh_plan(cfg, dfg.mfcs))}")
        return 0
    from realflow.system.runner import run_experiment

    return run_experiment(name, cfg)


def exit_process(code: int) -> None:
    """Exit with `code`. If a local worker thread is still inside a call (a hung or abandoned
    call), skip interpreter teardown, which would abort (SIGABRT) under a thread in torch."""
    from realflow.system.interrupt import worker_threads_alive

    if worker_threads_alive():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _yaml(cfg: object) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def cli() -> None:
    """The `realflow` console script and `python -m realflow.quickstart`."""
    exit_process(main())


if __name__ == "__main__":
    cli()
