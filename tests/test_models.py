import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lab import task
from dpo_lab.models import (build_tiny_model, build_tokenizer, generate, load_model, sft_model_dir,
                            task_success, tiny_config)


def test_tokenizer_is_character_level_and_round_trips():
    tok = build_tokenizer()
    text = "37+5=42 Hello, world!\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.pad_token_id != tok.eos_token_id
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_chat_template_renders_the_assistant_turn_after_the_prompt():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "1+2="}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "3"}], tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):] == "3<eos>\n"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_models_build_offline_and_run(arch):
    model = build_tiny_model(arch, seed=0)
    assert model.config.model_type == arch
    out = model(torch.tensor([[5, 6, 7]])).logits
    assert out.shape == (1, 3, len(build_tokenizer()))
    assert torch.equal(build_tiny_model(arch, seed=0).lm_head.weight, model.lm_head.weight)  # seeded


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown tiny architecture 'gpt9'"):
        tiny_config("gpt9")


@pytest.fixture(scope="module")
def sft_dir():
    return sft_model_dir()


def test_sft_model_is_cached_in_safetensors_and_loads_with_auto_classes(sft_dir):
    assert (sft_dir / "model.safetensors").exists()
    assert not list(sft_dir.glob("*.bin"))
    assert sft_model_dir() == sft_dir  # second call: cached, no retraining
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    tok = AutoTokenizer.from_pretrained(sft_dir)
    assert tok.chat_template and model.config.vocab_size == len(tok)
    log = json.loads((sft_dir / "sft_log.json").read_text())
    assert log["losses"][-1] < log["losses"][0] / 5


def test_sft_model_is_decent_but_clearly_imperfect(sft_dir):
    model, tok = load_model(sft_dir)
    test = task.read_jsonl(task.TASK_DIR / "test.jsonl")
    carry = [r for r in test if task.needs_carry(*task.parse_prompt(r["prompt"]))]
    plain = [r for r in test if not task.needs_carry(*task.parse_prompt(r["prompt"]))]
    assert task_success(model, tok, plain) > 0.85     # it learned to add
    assert task_success(model, tok, carry) < 0.6      # ...and the demonstrator's forgotten carry
    assert 0.4 < task_success(model, tok, test) < 0.85
    assert all(isinstance(c, str) for c in generate(model, tok, ["12+3="]))


def test_load_model_names_a_missing_model():
    with pytest.raises(OSError):
        load_model("/nonexistent/model-dir")
