"""The packed teacher-forced pass: no padding, and every number the padded pass gives."""

from __future__ import annotations

import pytest
import torch

from contraq.lm.forward import no_prompt_sharing
from contraq.lm.packing import no_packing, pack_rows, packed_logits, packing_usable
from contraq.lm.sampling import score_actions, token_logprobs
from test_lm_forward import ATOL, ORDER, batch_prompts, sampler_cfg


def rows_of_several_lengths(cfg, n_rows: int, width: int = 7, seed: int = 0) -> torch.Tensor:
    """``[n_rows, width]`` random actions, each row ended by the termination token at its own
    place (lengths 3 ... width), padding after it."""
    g = torch.Generator().manual_seed(seed)
    actions = torch.randint(100, 2000, (n_rows, width), generator=g)
    for b in range(n_rows):
        end = 2 + (b * 3) % (width - 2)
        actions[b, end] = cfg.termination_token_id
        actions[b, end + 1 :] = cfg.pad_token_id
    return actions


def test_pack_rows_lays_out_each_prompt_once_and_hides_other_rows():
    """A hand case: 3 rows, 2 distinct prompts (one left-padded), lengths 3, 1 and 2. Brute
    force over every (query, key) pair of each packed row: a question token sees its prompt and
    its own earlier tokens, a prompt token its earlier prompt tokens, padding only itself."""
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]])
    actions = torch.tensor([[11, 12, 13], [21, 0, 0], [31, 32, 0]])
    active = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]).bool()
    pk = pack_rows(prompt_ids, prompt_mask, actions, active)
    # distinct prompts sort as [0,5,6] then [7,8,9]; a row's last action is never fed
    assert pk.ids.tolist() == [[0, 5, 6, 11, 12, 31], [7, 8, 9, 0, 0, 0]]
    assert pk.positions.tolist() == [[0, 0, 1, 2, 3, 2], [0, 1, 2, 0, 0, 0]]
    owners = [["pad", "p", "p", 0, 0, 2], ["p", "p", "p", "pad", "pad", "pad"]]
    for u, owner in enumerate(owners):
        for q in range(6):
            for k in range(6):
                if owner[q] == "pad":
                    want = k == q
                elif owner[q] == "p":
                    want = k <= q and owner[k] == "p"
                else:
                    want = k <= q and owner[k] in ("p", owner[q])
                assert bool(pk.allowed[u, q, k]) == want, (u, q, k)
    # the logits of the last keep = 4 columns are read; slot (b, t) indexes [U * keep]:
    # the prompt's last column (index 0 of its row) predicts action 0, then the fed tokens
    assert pk.keep == 4
    assert pk.slot.tolist() == [[0, 1, 2], [4, 0, 0], [0, 3, 0]]
    assert pk.inverse.tolist() == [0, 1, 0]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_packed_pass_equals_each_row_scored_alone(arch, impl, request, smol_tokenizer):
    """log_pf, log_pterm, the prompt hidden states and the LoRA gradients of the packed pass
    equal those of each row's own padded full pass (no sharing, no packing), and the packed
    pass runs one row per distinct prompt, as long as its prompt and questions."""
    model = request.getfixturevalue(arch)
    hf = model.get_base_model()
    saved = hf.config._attn_implementation
    cfg = sampler_cfg(smol_tokenizer)
    ids, mask = batch_prompts(smol_tokenizer)
    actions = rows_of_several_lengths(cfg, len(ORDER))
    lora = [p for p in model.parameters() if p.requires_grad]
    try:
        hf.config._attn_implementation = impl
        assert packing_usable(model)
        seen: list[tuple[int, ...]] = []
        hook = model.get_input_embeddings().register_forward_hook(
            lambda _m, args, _o: seen.append(tuple(args[0].shape))
        )
        try:
            log_pf, log_pterm, hidden = score_actions(model, ids, mask, actions, cfg, True)
        finally:
            hook.remove()
        fed = (actions != cfg.pad_token_id).sum(1) - 1  # the last action is not fed
        rows = [[b for b, u in enumerate(ORDER) if u == p] for p in range(3)]
        longest = max(int(fed[r].sum()) for r in rows)
        assert seen == [(3, mask.shape[1] + longest)]  # one row per distinct prompt
        model.zero_grad()
        (log_pf.sum() + log_pterm.sum() + 0.1 * hidden.sum()).backward()
        packed_grads = [p.grad.clone() for p in lora]
        model.zero_grad()
        total = torch.zeros(())
        with no_prompt_sharing():
            for b in range(len(ORDER)):
                one = slice(b, b + 1)
                pf_b, pt_b, h_b = score_actions(model, ids[one], mask[one], actions[one], cfg, True)
                torch.testing.assert_close(pf_b, log_pf[one], atol=ATOL, rtol=0)
                torch.testing.assert_close(pt_b, log_pterm[one], atol=ATOL, rtol=0)
                real = mask[b].bool()
                torch.testing.assert_close(h_b[0][real], hidden[b][real], atol=ATOL, rtol=1e-4)
                assert bool((hidden[b][~real] == 0).all())
                total = total + pf_b.sum() + pt_b.sum() + 0.1 * (h_b[0] * real[:, None]).sum()
        total.backward()
        for got, want in zip(packed_grads, (p.grad for p in lora), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        model.zero_grad()
    finally:
        hf.config._attn_implementation = saved


def test_a_row_depends_on_its_own_tokens_and_prompt_only(tiny_llama, smol_tokenizer):
    """Changing row 0's second action changes its later log-probs and no other row's;
    changing its prompt's tokens changes every row of that prompt only."""
    cfg = sampler_cfg(smol_tokenizer)
    ids, mask = batch_prompts(smol_tokenizer)
    actions = rows_of_several_lengths(cfg, len(ORDER), seed=1)
    with torch.no_grad():
        base, _ = score_actions(tiny_llama, ids, mask, actions, cfg)
        other = actions.clone()
        other[0, 1] = 1234
        moved, _ = score_actions(tiny_llama, ids, mask, other, cfg)
        assert not torch.allclose(moved[0, 2:3], base[0, 2:3], atol=1e-4)
        torch.testing.assert_close(moved[1:], base[1:], atol=1e-6, rtol=0)
        p_ids = ids.clone()
        rows = [b for b, u in enumerate(ORDER) if u == 2]
        p_ids[rows, -2] = 4321  # prompt 2's next-to-last token, in each of its rows
        moved, _ = score_actions(tiny_llama, p_ids, mask, actions, cfg)
        for b in range(len(ORDER)):
            same = torch.allclose(moved[b], base[b], atol=1e-6)
            assert same == (b not in rows), b


def test_packed_logits_are_zero_in_inactive_slots_and_match_the_padded_pass(
    tiny_gpt2, smol_tokenizer
):
    """The base LM's log P_Q (token_logprobs) is the same packed or padded, and the packed
    logits hold 0 past each row's end."""
    cfg = sampler_cfg(smol_tokenizer)
    ids, mask = batch_prompts(smol_tokenizer)
    actions = rows_of_several_lengths(cfg, len(ORDER), seed=2)
    active = actions != cfg.pad_token_id
    with torch.no_grad():
        logits, hidden = packed_logits(tiny_gpt2, ids, mask, actions, active)
        assert hidden is None
        assert bool((logits[~active] == 0).all()) and bool((logits[active] != 0).any(-1).all())
        packed = token_logprobs(tiny_gpt2, ids, mask, actions, active.sum(1))
        with no_packing():
            padded = token_logprobs(tiny_gpt2, ids, mask, actions, active.sum(1))
    torch.testing.assert_close(packed, padded, atol=ATOL, rtol=0)


def test_other_attention_implementations_get_the_padded_pass(tiny_llama):
    hf = tiny_llama.get_base_model()
    saved = hf.config._attn_implementation
    try:
        hf.config._attn_implementation = "flash_attention_2"
        assert not packing_usable(tiny_llama)
    finally:
        hf.config._attn_implementation = saved
    with no_packing():
        assert not packing_usable(tiny_llama)
    assert packing_usable(tiny_llama)


def test_distinct_prompts_pack_no_wider_than_the_padded_pass():
    """With every prompt distinct, each packed row is one prompt and its question: the padded
    pass's shape, so the mask's quadratic cost never exceeds it."""
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(10, 99, (5, 6), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    actions = torch.randint(100, 200, (5, 4), generator=g)
    active = torch.arange(4)[None, :] < torch.tensor([4, 1, 3, 2, 4])[:, None]
    pk = pack_rows(prompt_ids, prompt_mask, actions, active)
    assert tuple(pk.ids.shape) == (5, 6 + 3) and pk.keep == 4
