"""Hugging Face model directories in training: init_from, teachers (ours and transformers'), student_init,
the directory's tokenizer flowing into the token cache, and out again through export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_models import VOCAB, save_tiny
from vishwamai.checkpoint import load_model
from vishwamai.errors import ConfigError
from vishwamai.train.events import Callback
from vishwamai.training_v2 import compose_config, run

pytest.importorskip("transformers")

FAST = ["training.max_steps=3", "training.eval_every_n_steps=0", "checkpointing.save_best=false"]


def _distill(teacher: Path, *extra: str) -> list[str]:
    return ["distillation.enabled=true", f"distillation.teacher_model.path={teacher}", *extra]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class FirstWeights(Callback):
    """The student's weights when training starts (after on_init, before the first step)."""

    def on_train_start(self, trainer) -> None:
        self.state = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}


def test_gpt2_teacher_distils_a_vishwamai_student_through_transformers(tmp_path, tiny_overrides):
    """Any causal LM transformers loads is a teacher: logit KD, hidden states through a projection, attention maps."""
    teacher = save_tiny("gpt2", tmp_path / "gpt2")
    run(compose_config(tiny_overrides + FAST + [f"model.vocab_size={VOCAB}"] + _distill(
        teacher, "distillation.hidden_distillation.enabled=true", "distillation.attention_distillation.enabled=true"),
        run_dir=str(tmp_path / "run")))
    steps = [r for r in _records(tmp_path / "run") if "loss_kd" in r]
    assert len(steps) == 3
    for key in ("loss_kd", "loss_hidden", "loss_attention"):
        assert all(r[key] > 0 and r[key] == r[key] for r in steps), key


def test_vocabulary_mismatch_and_unconvertible_init_from_are_refused_before_training(tmp_path, tiny_overrides):
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(ConfigError) as err:  # student vocab 257 (bytes), teacher 300
        run(compose_config(tiny_overrides + _distill(gpt2), run_dir=str(tmp_path / "a")))
    assert err.value.key == "distillation.teacher_model.path"
    assert "vocabulary (300 tokens)" in str(err.value) and "model.vocab_size=257" in str(err.value)
    with pytest.raises(ConfigError) as err:
        run(compose_config(tiny_overrides + [f"training.init_from={gpt2}"], run_dir=str(tmp_path / "b")))
    assert err.value.key == "training.init_from"
    assert "GPT2LMHeadModel" in str(err.value) and "LlamaForCausalLM" in str(err.value)
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


def test_student_init_teacher_layers_copies_evenly_spaced_blocks(tmp_path, tiny_overrides):
    teacher_dir = save_tiny("llama", tmp_path / "llama", num_hidden_layers=4)
    probe = FirstWeights()
    overrides = tiny_overrides + FAST + ["model.d_model=32", "model.n_layers=2", f"model.vocab_size={VOCAB}"]
    summary = run(compose_config(overrides + _distill(teacher_dir, "distillation.student_init=teacher_layers"),
                                 run_dir=str(tmp_path / "run")), extra_callbacks=[probe])
    assert summary["student_init_teacher_blocks"] == [1, 3]
    teacher = load_model(teacher_dir).state_dict()
    for name, value in probe.state.items():
        source = name.replace("blocks.0.", "blocks.1.", 1) if name.startswith("blocks.0.") else \
            name.replace("blocks.1.", "blocks.3.", 1) if name.startswith("blocks.1.") else name
        assert torch.equal(value, teacher[source]), name
    with pytest.raises(ConfigError) as err:  # another width
        run(compose_config(overrides + ["model.d_model=64"] + _distill(
            teacher_dir, "distillation.student_init=teacher_layers"), run_dir=str(tmp_path / "wide")))
    assert err.value.key == "distillation.student_init"
    assert "model.d_model=64" in str(err.value) and "d_model=32" in str(err.value)


def _bpe_tokenizer(directory: Path, vocab_size: int) -> int:
    """A byte-level BPE trained on the embedded corpus, saved as a model directory's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from vishwamai.data.corpus import iter_documents, resolve_sources

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter_documents(resolve_sources(None, 200_000)), trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return tok.get_vocab_size()


def test_model_directory_tokenizer_flows_into_the_data_and_out_through_export(tmp_path, tiny_overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vishwamai.hf.export import export

    model_dir = save_tiny("llama", tmp_path / "llama")
    vocab = _bpe_tokenizer(model_dir, VOCAB)
    summary = run(compose_config(tiny_overrides + FAST + [f"training.init_from={model_dir}",
                                                          f"data.cache_dir={tmp_path / 'cache'}"],
                                 run_dir=str(tmp_path / "run")))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"tokenizer: {model_dir}" in saved
    meta = json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())
    assert meta["tokenizer"].startswith("hf-") and meta["vocab_size"] == vocab
    assert summary["steps"] == 3

    out = export(tmp_path / "run", tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("</s>")
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)


def test_cli_init_from_a_pickle_only_directory_exits_2(tmp_path, tiny_overrides, run_module):
    d = save_tiny("llama", tmp_path / "llama")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    proc = run_module("vishwamai.training_v2", *tiny_overrides, f"training.init_from={d}",
                      f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "convert them to safetensors" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # the quantization report times fp32 and int8 forwards (~15 s on a quiet machine)
def test_quantize_cli_measures_a_model_directory_with_its_own_tokenizer(tmp_path):
    from vishwamai.compress import quantize_model_dir
    from vishwamai.config import DataConfig

    model_dir = save_tiny("llama", tmp_path / "llama")
    vocab = _bpe_tokenizer(model_dir, VOCAB)
    data = DataConfig(seq_len=32, cache_dir=str(tmp_path / "cache"), embedded_max_bytes=200_000)
    report = quantize_model_dir(model_dir, tmp_path / "int8", "dynamic", 2, data)
    assert report["quantized_val_loss"] == report["quantized_val_loss"]  # finite, measured
    meta = json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())
    assert meta["tokenizer"].startswith("hf-") and meta["vocab_size"] == vocab


def test_student_init_is_validated(tmp_path, tiny_overrides):
    import re

    from vishwamai.config import validate

    teacher = f"distillation.teacher_model.path={tmp_path}"
    cases = ((["distillation.student_init=teacher_layers"], "needs distillation.enabled=true"),
             (["distillation.student_init=halves", "distillation.enabled=true", teacher],
              "expected one of ['random', 'teacher_layers']"))
    for overrides, words in cases:
        cfg = compose_config(tiny_overrides + overrides, run_dir=str(tmp_path / "run"))
        with pytest.raises(ConfigError, match=re.escape(words)) as err:
            validate(cfg)
        assert err.value.key == "distillation.student_init"


def test_init_from_a_llama3_rope_scaled_model_trains_and_keeps_its_scaling(tmp_path, tiny_overrides):
    from vishwamai.checkpoint import find_model_dir, read_model_config
    from vishwamai.config import RopeScalingConfig

    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    model_dir = save_tiny("llama", tmp_path / "llama", rope_scaling=scaling)
    summary = run(compose_config(tiny_overrides + FAST + [f"training.init_from={model_dir}"],
                                 run_dir=str(tmp_path / "run")))
    assert summary["steps"] == 3
    assert read_model_config(find_model_dir(tmp_path / "run")).rope_scaling == RopeScalingConfig(
        type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=16)
