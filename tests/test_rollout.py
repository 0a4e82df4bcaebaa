"""Rollouts (dpo_lab.rl.rollout): KV-cached decoding equals uncached decoding and HF generate,
samples don't depend on the batch layout, log-probs and entropies equal transformers/torch's own,
and the checkers accept what they say."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_lab import task
from dpo_lab.models import build_tiny_model, build_tokenizer, sft_model_dir
from dpo_lab.rl import rollout as R


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def sft():
    return AutoModelForCausalLM.from_pretrained(sft_model_dir(progress=False)).eval()


@pytest.fixture(scope="module")
def prompts():
    return [r["prompt"] for r in task.read_jsonl(task.TASK_DIR / "train.jsonl")[:6]]


def _ids(tok, prompt, rows):
    return torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]] * rows)


@pytest.mark.parametrize("which", ["random", "sft"])
@pytest.mark.parametrize("sampled", [False, True])
def test_cached_decoding_equals_uncached(tok, sft, prompts, which, sampled):
    # the random model rarely says EOS: long completions exercise the cache over many positions
    model = build_tiny_model(seed=3).eval() if which == "random" else sft
    n_new = 12 if which == "random" else 6
    for k, p in enumerate(prompts[:3]):
        outs = []
        for use_cache in (True, False):
            gen = torch.Generator().manual_seed(k) if sampled else None
            outs.append(R.decode(model, _ids(tok, p, 4), n_new, tok.eos_token_id, tok.pad_token_id, gen,
                                 temperature=1.5, use_cache=use_cache))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        if sampled and which == "random":
            assert len({tuple(r) for r in outs[0][0].tolist()}) > 1  # really sampled


def test_greedy_decoding_equals_hf_generate(tok, sft, prompts):
    model = build_tiny_model(seed=3).eval()
    for m, n_new in ((model, 10), (sft, 6)):
        for p in prompts[:3]:
            ids = _ids(tok, p, 1)
            ours, mask = R.decode(m, ids, n_new, tok.eos_token_id, tok.pad_token_id)
            hf = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                            do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            hf = hf[:, ids.shape[1]:]
            assert torch.equal(ours[:, :hf.shape[1]], hf)
            assert mask.sum().item() == hf.shape[1] - int((hf == tok.pad_token_id).sum())


def test_completion_mask_covers_up_to_and_with_eos(tok, sft, prompts):
    c, m = R.decode(sft, _ids(tok, prompts[0], 2), 6, tok.eos_token_id, tok.pad_token_id)
    for row, mrow in zip(c.tolist(), m.tolist()):
        n = row.index(tok.eos_token_id) + 1  # the SFT model ends its answers with EOS
        assert mrow == [1] * n + [0] * (len(row) - n)


def test_masked_truncation_equals_trl(tok, sft, prompts):
    """DAPO's overlong filtering: completions cut at max_new_tokens lose their whole mask, as TRL's
    mask_truncated_completions does to the same completions (TRL's `_generate_and_score_completions`)."""
    from dpo_lab.rl import trl_check
    G = 4
    kw = dict(seed=0, step=0, max_new_tokens=3, temperature=2.0)  # hot and short: some answers get cut
    full = R.rollout(sft, tok, prompts[:3], G, **kw)
    ro = R.rollout(sft, tok, prompts[:3], G, mask_truncated=True, **kw)
    assert torch.equal(full.completion_ids, ro.completion_ids)
    cut = ro.completion_mask.sum(1) == 0
    assert 0 < cut.sum() < len(cut)  # both kinds in the batch
    assert torch.equal(ro.completion_mask[~cut], full.completion_mask[~cut])
    unpadded = [row[:n].tolist() for row, n in zip(full.completion_ids, full.completion_mask.sum(1))]
    theirs = trl_check.trl_truncation_mask(unpadded, G)
    assert torch.equal(ro.completion_mask[:, :theirs.shape[1]], theirs.to(ro.completion_mask.dtype))
    assert ro.completion_mask[:, theirs.shape[1]:].sum() == 0


@pytest.mark.parametrize("which", ["random", "sft"])
def test_samples_do_not_depend_on_the_batch_layout(tok, sft, prompts, which):
    # the random model's samples vary a lot with the seed, so a seed that ignores the prompt's
    # global index shows there; the SFT model's show that the rewards travel with them
    model = build_tiny_model(seed=3).eval() if which == "random" else sft
    whole = R.rollout(model, tok, prompts[:4], 4, seed=7, step=3, temperature=1.5)
    halves = [R.rollout(model, tok, prompts[i:i + 2], 4, seed=7, step=3, first_index=i, temperature=1.5)
              for i in (0, 2)]
    assert whole.completions == halves[0].completions + halves[1].completions
    assert torch.equal(whole.rewards, torch.cat([h.rewards for h in halves]))
    assert torch.equal(whole.completion_ids[8:, :halves[1].completion_ids.shape[1]], halves[1].completion_ids)
    other_step = R.rollout(model, tok, prompts[:4], 4, seed=7, step=4, temperature=1.5)
    assert other_step.completions != whole.completions  # the step is in the seed
    assert whole.rewards.tolist() == [float(task.is_correct(p, c)) for p, c in zip(whole.prompts, whole.completions)]


def test_logps_and_entropy_equal_transformers_and_torch(tok, sft, prompts):
    ro = R.rollout(sft, tok, prompts[:3], 4, seed=0, step=0, temperature=2.0)
    logps, ent = R.token_logps_and_entropy(sft, ro.prompt_ids, ro.completion_ids, ro.completion_mask)
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attn = torch.cat([torch.ones_like(ro.prompt_ids), ro.completion_mask], 1)
    labels = torch.cat([torch.full_like(ro.prompt_ids, -100),
                        ro.completion_ids.masked_fill(ro.completion_mask == 0, -100)], 1)
    for i in range(ids.shape[0]):  # transformers' own shifted cross-entropy, one row at a time
        hf = sft(input_ids=ids[i:i + 1], attention_mask=attn[i:i + 1], labels=labels[i:i + 1]).loss
        ours = -(logps[i] * ro.completion_mask[i]).sum() / ro.completion_mask[i].sum()
        assert abs(ours.item() - hf.item()) <= 1e-5
    logits = sft(input_ids=ids, attention_mask=attn).logits[:, ro.prompt_ids.shape[1] - 1:-1]
    twin = torch.distributions.Categorical(logits=logits.float()).entropy()
    assert (ent - twin).abs().max().item() <= 1e-5


def test_checkers():
    assert R.exact("37+5=", "42") and not R.exact("37+5=", "32 42") and not R.exact("37+5=", "427")
    assert R.contains("37+5=", "32 42") and not R.contains("37+5=", "427") and not R.contains("37+5=", "32")
    assert R.prefix("37+5=", "427") and not R.prefix("37+5=", "32 42")
    assert R.units("37+5=", "32") and R.units("37+5=", "42") and not R.units("37+5=", "43")
    assert not R.units("37+5=", "")


def test_bad_inputs_are_named(tok, sft):
    with pytest.raises(ValueError, match="temperature=0"):
        R.decode(sft, _ids(tok, "37+5=", 1), 2, tok.eos_token_id, tok.pad_token_id, temperature=0)
    with pytest.raises(ValueError, match=r"lengths \[5, 6\]"):
        R.rollout(sft, tok, ["37+5=", "37+15="], 2, seed=0, step=0)
