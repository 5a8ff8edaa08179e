"""<role>.offload on a trained role: the worker offloads it after setup and after each call and
brings it back before each call, as it does a never-trained role; on CPU nothing moves (said
once per model in the log) and the numbers are those of a run without offload.
(The move itself is tested on CUDA in tests/engines/test_offload.py.)"""

import logging

from realflow.engines import InferenceEngine, TrainEngine
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
    cfg.actor.offload = cfg.ref.offload = offload
    return run("dpo", cfg).rows


def test_offloaded_actor_and_ref_give_the_same_losses(tmp_path, caplog, monkeypatch):
    calls = []
    for cls in (TrainEngine, InferenceEngine):
        for method in ("offload", "onload"):
            real = getattr(cls, method)

            def spy(self, real=real, name=f"{cls.__name__}.{method}"):
                calls.append(name)
                return real(self)

            monkeypatch.setattr(cls, method, spy)

    plain = _dpo(tmp_path, "plain", offload=False)
    assert calls == []
    with caplog.at_level(logging.INFO, logger="realflow.engines.offload"):
        offloaded = _dpo(tmp_path, "offload", offload=True)
    # after setup, then around each of the 2 calls (actor_train; ref_inf) of each model
    for engine in ("TrainEngine", "InferenceEngine"):
        assert calls.count(f"{engine}.offload") == 3, calls
        assert calls.count(f"{engine}.onload") == 2, calls
    said = [r.getMessage() for r in caplog.records if "nothing to move" in r.getMessage()]
    assert said == ["offload of PackedTransformer: nothing to move (it is on cpu)"] * 2
    assert [r["loss"] for r in offloaded] == [r["loss"] for r in plain]
