import math

import pytest
import torch
import torch.nn.functional as F

from common import vit


def reference_attention(x, weight, bias, proj, heads, mask=None):
    """softmax(Q K^T / sqrt(d)) V written out by hand."""
    B, N, D = x.shape
    q, k, v = (x @ weight.T + bias).split(D, dim=-1)
    q, k, v = (t.reshape(B, N, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    return proj(out)


def test_attention_matches_hand_written_softmax():
    torch.manual_seed(0)
    attn = vit.Attention(16, 4)
    torch.nn.init.normal_(attn.qkv.bias)
    x = torch.randn(2, 5, 16)
    ref = reference_attention(x, attn.qkv.weight, attn.qkv.bias, attn.proj, 4)
    torch.testing.assert_close(attn(x), ref)
    mask = torch.rand(5, 5) > 0.4
    mask.fill_diagonal_(True)  # every query sees at least itself
    torch.testing.assert_close(attn(x, attn_mask=mask), reference_attention(
        x, attn.qkv.weight, attn.qkv.bias, attn.proj, 4, mask))


def test_qv_bias_has_zero_k_bias_and_trains_q_and_v():
    torch.manual_seed(0)
    attn = vit.Attention(8, 2, qv_bias=True)
    assert attn.qkv.bias is None
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(3, 4, 8)
    bias = torch.cat([attn.q_bias, torch.zeros(8), attn.v_bias]).detach()
    assert torch.equal(attn.effective_qkv_bias(), bias)  # k slice zero
    torch.testing.assert_close(attn(x), reference_attention(x, attn.qkv.weight, bias, attn.proj, 2))
    attn(x).square().sum().backward()
    assert attn.q_bias.grad.abs().sum() > 0 and attn.v_bias.grad.abs().sum() > 0


BLOCK_KEYS = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"}


@pytest.mark.parametrize("init_values, qv_bias", [(None, False), (1e-5, False), (None, True)])
def test_state_dict_keys_follow_timm(init_values, qv_bias):
    m = vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=8, depth=1, num_heads=2,
                              init_values=init_values, qv_bias=qv_bias)
    block = set(BLOCK_KEYS)
    if init_values:
        block |= {"ls1.gamma", "ls2.gamma"}
        assert torch.equal(m.blocks[0].ls1.gamma, torch.full((8,), 1e-5))
    if qv_bias:
        block = (block - {"attn.qkv.bias"}) | {"attn.q_bias", "attn.v_bias"}
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias"} | {f"blocks.0.{k}" for k in block}
    assert set(m.state_dict()) == expected


def test_vit_small_parameter_count_matches_timm():
    # timm vit_small_patch16_224 without head: 21,665,664 parameters.
    dim, depth, heads = vit.vit_sizes["small"]
    m = vit.VisionTransformer(embed_dim=dim, depth=depth, num_heads=heads)
    assert sum(p.numel() for p in m.parameters()) == 21_665_664


def test_sincos_1d_values_by_hand():
    t = vit.sincos_1d(5, 8)
    assert t.shape == (5, 8) and t.dtype == torch.float32
    # position 3: dims (0,1) use 3/10000^0, dims (4,5) use 3/10000^(4/8) = 0.03
    expected = torch.tensor([math.sin(3), math.cos(3), math.sin(0.03), math.cos(0.03)])
    torch.testing.assert_close(t[3, [0, 1, 4, 5]], expected)
    torch.testing.assert_close(t[0], torch.tensor([0.0, 1.0] * 4))


def test_sincos_2d_halves_and_values():
    t = vit.sincos_2d(3, 4, 8, cls_token=True)
    assert t.shape == (1 + 12, 8)
    assert torch.equal(t[0], torch.zeros(8))
    # dim 8: omega = [1, 1/100]; token (y, x) = [sin x, sin x/100, cos x, cos x/100, same for y]
    y, x = 1, 2
    expected = torch.tensor([math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100),
                             math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100)])
    torch.testing.assert_close(t[1 + y * 4 + x], expected)
    # (y=0, x=1) differs from (0, 0) only in the column half; (1, 0) only in the row half
    diff_x, diff_y = t[2] != t[1], t[5] != t[1]
    assert diff_x[:4].all() and not diff_x[4:].any()
    assert diff_y[4:].all() and not diff_y[:4].any()
    assert torch.equal(vit.sincos_2d(3, 4, 8), t[1:])


def test_patchify_round_trip_and_row_major_order():
    img = torch.randn(2, 3, 8, 12)
    tokens = vit.patchify(img, 4)
    assert tokens.shape == (2, 6, 48)
    # token 4 = (row 1, col 1): pixels [4:8, 4:8], flattened (p, p, C)
    assert torch.equal(tokens[1, 4], img[1, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(vit.unpatchify(tokens, 4, 2, 3), img)


def test_patchify_video_round_trip_and_t_major_order():
    v = torch.randn(2, 3, 4, 8, 12)
    tokens = vit.patchify_video(v, 2, 4)
    assert tokens.shape == (2, 2 * 2 * 3, 2 * 4 * 4 * 3)
    # token (t=1, h=0, w=2) -> 1*6 + 0*3 + 2 = 8; within the tube order (t, p, p, C)
    assert torch.equal(tokens[0, 8], v[0, :, 2:4, 0:4, 8:12].permute(1, 2, 3, 0).reshape(-1))
    assert torch.equal(vit.unpatchify_video(tokens, 2, 4, 2, 2, 3), v)


def test_embeds_use_the_patchify_token_order():
    torch.manual_seed(0)
    pe = vit.PatchEmbed(16, 4, 3, 5)
    img = torch.randn(2, 3, 8, 12)  # another size than built: accepted
    w = pe.proj.weight.permute(0, 2, 3, 1).reshape(5, -1)  # (D, p*p*C) in patchify's order
    torch.testing.assert_close(pe(img), vit.patchify(img, 4) @ w.T + pe.proj.bias)
    te = vit.TubeletEmbed(2, 4, 3, 5)
    v = torch.randn(2, 3, 4, 8, 8)
    w = te.proj.weight.permute(0, 2, 3, 4, 1).reshape(5, -1)
    torch.testing.assert_close(te(v), vit.patchify_video(v, 2, 4) @ w.T + te.proj.bias)
    with pytest.raises(ValueError, match="divisible"):
        pe(torch.randn(1, 3, 10, 12))


def test_tubelet_embed_of_some_tubelets_is_the_convolution_gathered():
    torch.manual_seed(0)
    te = vit.TubeletEmbed(2, 4, 3, 5)
    v = torch.randn(2, 3, 5, 9, 8)  # remainders the convolution drops: 2 x 2 x 2 tokens
    ids = torch.tensor([[0, 3, 5, 7], [1, 2, 4, 6]])
    full = te(v)
    assert full.shape == (2, 8, 5)
    torch.testing.assert_close(te(v, ids), vit.gather_tokens(full, ids))
    g = torch.randn(2, 4, 5)
    w_full = torch.autograd.grad((vit.gather_tokens(full, ids) * g).sum(), te.proj.weight)[0]
    w_some = torch.autograd.grad((te(v, ids) * g).sum(), te.proj.weight)[0]
    torch.testing.assert_close(w_some, w_full)


def test_gather_tokens_per_sample():
    x = torch.arange(2 * 4 * 3.0).reshape(2, 4, 3)
    idx = torch.tensor([[3, 0], [1, 1]])
    assert torch.equal(vit.gather_tokens(x, idx), torch.stack([x[0, [3, 0]], x[1, [1, 1]]]))


def small_vit(**kw):
    torch.manual_seed(0)
    m = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, **kw)
    return m.eval()


def test_forward_features_keep_idx_is_equivariant():
    m = small_vit()
    x = torch.randn(2, 3, 32, 32)
    full = m.forward_features(x)
    assert full.shape == (2, 17, 16)
    torch.testing.assert_close(m.forward_features(x, torch.arange(16).expand(2, 16)), full)
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    out = m.forward_features(x, perm)
    torch.testing.assert_close(out[:, 0], full[:, 0])
    torch.testing.assert_close(out[:, 1:], vit.gather_tokens(full[:, 1:], perm))
    # a subset per sample equals running that sample alone on its subset
    keep = perm[:, :5]
    out = m.forward_features(x, keep)
    assert out.shape == (2, 6, 16)
    for b in range(2):
        torch.testing.assert_close(out[b:b + 1], m.forward_features(x[b:b + 1], keep[b:b + 1]))
    # and equals the pipeline written out: the kept tokens attend only to each other and CLS
    tok = vit.gather_tokens(m.patch_embed(x) + m.pos_embed[:, 1:], keep)
    tok = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), tok], 1)
    torch.testing.assert_close(out, m.norm(m.blocks[1](m.blocks[0](tok))))


def test_pos_embed_kinds():
    m = small_vit()
    assert not m.pos_embed.requires_grad
    torch.testing.assert_close(m.pos_embed[0], vit.sincos_2d(4, 4, 16, cls_token=True))
    learned = small_vit(pos_embed="learned")
    assert learned.pos_embed.requires_grad and 0 < learned.pos_embed.std() < 0.03
    no_cls = small_vit(cls_token=False)
    assert no_cls.cls_token is None
    assert no_cls.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 16, 16)


def test_interpolate_pos_embed():
    pe = torch.randn(1, 1 + 16, 8)
    assert torch.equal(vit.interpolate_pos_embed(pe, (4, 4)), pe)
    out = vit.interpolate_pos_embed(pe, (6, 3))
    assert out.shape == (1, 1 + 18, 8) and torch.equal(out[:, :1], pe[:, :1])
    # bicubic resizing keeps a constant grid constant
    const = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 16, 8), 0.5)], 1)
    out = vit.interpolate_pos_embed(const, (7, 5))
    torch.testing.assert_close(out[:, 1:], torch.full((1, 35, 8), 0.5))
    m = small_vit()  # evaluating at another resolution interpolates the table
    assert m.forward_features(torch.randn(1, 3, 48, 40)).shape == (1, 1 + 30, 16)


def test_drop_path_identity_in_eval_and_unbiased_in_train():
    dp = vit.DropPath(0.25)
    x = torch.ones(20000, 2, 3)
    assert torch.equal(dp.eval()(x), x)
    torch.manual_seed(0)
    y = dp.train()(x)
    per_sample = y[:, 0, 0]
    assert torch.equal(y, per_sample[:, None, None].expand_as(y))  # whole samples dropped
    torch.testing.assert_close(per_sample.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs(y.mean().item() - 1.0) < 0.02


def test_block_with_drop_path_is_deterministic_in_eval():
    torch.manual_seed(0)
    blk = vit.Block(16, 2, drop_path=0.5, init_values=0.1)
    x = torch.randn(4, 5, 16)
    blk.eval()
    a = blk(x)
    h = x + 0.1 * blk.attn(blk.norm1(x))
    torch.testing.assert_close(a, h + 0.1 * blk.mlp(blk.norm2(h)))
    assert isinstance(blk.mlp.act, torch.nn.GELU) and blk.mlp.act.approximate == "none"
    assert torch.allclose(blk.mlp(x), blk.mlp.fc2(F.gelu(blk.mlp.fc1(x))))


def test_register_tokens_and_no_embed_class():
    """DINOv2-with-registers layout: CLS, then the registers (no position), then the patches
    (with the position table, which covers the patches only)."""
    torch.manual_seed(0)
    net = vit.VisionTransformer(28, 14, 3, 8, 0, 2, pos_embed="learned", reg_tokens=4,
                                no_embed_class=True)  # depth 0: the output is norm(tokens)
    assert net.pos_embed.shape == (1, 4, 8) and net.reg_token.shape == (1, 4, 8)
    assert net.num_prefix == 5 and net.n_extra == 0
    x = torch.randn(2, 3, 28, 28)
    out = net.forward_features(x)
    assert out.shape == (2, 5 + 4, 8)
    patches = net.patch_embed(x) + net.pos_embed
    assert torch.allclose(out[:, 0], net.norm(net.cls_token[0]).expand(2, -1), atol=1e-6)
    assert torch.allclose(out[:, 1:5], net.norm(net.reg_token).expand(2, -1, -1), atol=1e-6)
    assert torch.allclose(out[:, 5:], net.norm(patches), atol=1e-6)
    plain = vit.VisionTransformer(28, 14, 3, 8, 0, 2, pos_embed="learned")
    assert plain.pos_embed.shape == (1, 1 + 4, 8) and plain.num_prefix == 1  # CLS has a position
