"""<role>.offload on a never-trained role: the worker offloads it after setup and around each
call (on CPU nothing moves, logged once), and the numbers are those of a run without offload."""

import logging

from realflow.experiments.dpo import DPOConfig
from realflow.system.runner import run


def _dpo(tmp_path, name: str, offload: bool) -> list[dict]:
    cfg = DPOConfig(
        output_dir=str(tmp_path / name),
        total_steps=2,
        n_seqs=4,
        tensorboard=False,
        progress_bar=False,
    )
    cfg.actor.path = cfg.ref.path = "builtin:tiny"
    cfg.ref.offload = offload
    return run("dpo", cfg).rows


def test_offloaded_ref_gives_the_same_losses(tmp_path, caplog):
    plain = _dpo(tmp_path, "plain", offload=False)
    with caplog.at_level(logging.INFO, logger="realflow.engines.offload"):
        offloaded = _dpo(tmp_path, "offload", offload=True)
    messages = [r.getMessage() for r in caplog.records]
    # on CPU nothing moves: said once, not per call (tests/system/test_offload_trained.py
    # counts the worker's offload and onload calls)
    assert sum("nothing to move" in m for m in messages) == 1
    assert [r["loss"] for r in offloaded] == [r["loss"] for r in plain]
