"""Building blocks against independent brute-force definitions written out loop by loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from dat.layers import DeformableAttention, WindowAttention, blocking
from dat.layers.mlp import DwConvMlp, ResidualDepthwiseConv
from dat.layers.grids import query_grid, reference_points
from dat.ops import deformable_attention_reference


def _brute_force_window_attention(module: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Each query attends to the keys of its window (on the map padded to whole windows and rolled by the
    shift) that are real pixels and, when shifted, did not wrap around differently from the query."""
    B, C, H, W = x.shape
    ws, shift, heads = module.window_size, module.shift_size, module.num_heads
    head_dim = C // heads
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    tokens = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    tokens[:, :H, :W] = x.permute(0, 2, 3, 1)
    qkv = module.proj_qkv(tokens)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    table = module.relative_position_bias_table.detach()
    out = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)

    def original(r, c):  # rolled coordinates -> original coordinates and wrap status
        return (r + shift) % Hp, (c + shift) % Wp, (r + shift >= Hp, c + shift >= Wp)

    for r in range(Hp):
        for c in range(Wp):
            qy, qx, q_wrap = original(r, c)
            keys = []
            for kr in range(r // ws * ws, r // ws * ws + ws):
                for kc in range(c // ws * ws, c // ws * ws + ws):
                    ky, kx, k_wrap = original(kr, kc)
                    if ky < H and kx < W and (shift == 0 or k_wrap == q_wrap):
                        keys.append((kr, kc, ky, kx))
            if not keys or qy >= H or qx >= W:
                continue
            for h in range(heads):
                sl = slice(h * head_dim, (h + 1) * head_dim)
                scores = torch.stack([
                    (q[:, qy, qx, sl] * k[:, ky, kx, sl]).sum(-1) * module.scale
                    + table[((r % ws) - (kr % ws) + ws - 1) * (2 * ws - 1) + (c % ws) - (kc % ws) + ws - 1, h]
                    for kr, kc, ky, kx in keys], dim=-1)
                weights = scores.softmax(-1)
                values = torch.stack([v[:, ky, kx, sl] for _, _, ky, kx in keys], dim=1)
                out[:, qy, qx, sl] = (weights[..., None] * values).sum(1)
    return module.proj_out(out[:, :H, :W]).permute(0, 3, 1, 2)


@pytest.mark.parametrize('size,window,shift', [
    ((7, 7), 7, 0), ((14, 14), 7, 4), ((12, 12), 6, 3),  # official sizes: no padding
    ((9, 11), 7, 0), ((9, 11), 7, 4), ((5, 3), 7, 4), ((1, 1), 7, 4), ((13, 8), 4, 2),  # padded
])
@pytest.mark.parametrize('block_windows', [None, 1, 3])
def test_window_attention_matches_brute_force(size, window, shift, block_windows, monkeypatch):
    """`block_windows`: inference runs over blocks of that many windows (dat.layers.blocking); 1 and 3 cut
    across images, so each block reads its windows' masks by index."""
    if block_windows is not None:
        tokens = window * window
        monkeypatch.setattr(blocking, 'BLOCK_ELEMENTS', block_windows * tokens * max(3 * 16, 2 * tokens))
    torch.manual_seed(1)
    module = WindowAttention(16, 2, window, shift).double()
    with torch.no_grad():
        module.relative_position_bias_table.normal_()
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), _brute_force_window_attention(module, x), atol=1e-10, rtol=0)


def test_window_masks_are_cached_per_size_and_follow_the_logits_dtype():
    module, windows = WindowAttention(8, 2, 7, 4), torch.empty(0)
    mask = module.attention_mask(14, 14, windows)
    assert module.attention_mask(14, 14, windows) is mask
    assert module.attention_mask(15, 14, windows).shape == (6, 49, 49)  # padded to 21x14
    assert module.attention_mask(14, 14, windows.bfloat16()).dtype == torch.float32  # fp32 logits (dat.precision)
    assert module.attention_mask(14, 14, windows.double()).dtype == torch.float64
    assert WindowAttention(8, 2, 7, 0).attention_mask(14, 14, windows) is None


def _bilinear_corners(table: torch.Tensor, y: float, x: float) -> float:
    """grid_sample(align_corners=True, zeros padding) of one 2-D table at normalised (y, x), tap by tap."""
    Th, Tw = table.shape
    py, px = (y + 1) / 2 * (Th - 1), (x + 1) / 2 * (Tw - 1)
    y0, x0 = math.floor(py), math.floor(px)
    total = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < Th and 0 <= xx < Tw:
                total += wy * wx * float(table[yy, xx])
    return total


@pytest.mark.parametrize('generation', ['dat', 'dat_pp'])
@pytest.mark.parametrize('groups,key_stride', [(1, 1), (2, 1), (2, 2)])
def test_deformable_attention_matches_brute_force(generation, groups, key_stride):
    torch.manual_seed(2)
    dim, heads, H, W = 8, 4, 5, 6
    module = DeformableAttention(dim, heads, groups, table_size=(7, 9), use_rpe=True, key_stride=key_stride,
                                 offset_kernel=3, offset_range_factor=-1, generation=generation).double()
    with torch.no_grad():
        module.rpe_table.normal_()
        module.conv_offset[3].weight.normal_(std=2.0)  # large offsets: keys near and beyond the table border
    x = torch.randn(1, dim, H, W, dtype=torch.float64)
    with torch.no_grad():
        expected_out = module(x)
        q = module.proj_q(x)
        pos, _ = module.sampling_positions(x, q)
        Hk, Wk = pos.shape[2:4]
        sampled = torch.nn.functional.grid_sample(
            x.reshape(groups, dim // groups, H, W), pos[0].flip(-1), align_corners=True).reshape(1, dim, 1, Hk * Wk)
        k, v = module.proj_k(sampled)[0, :, 0], module.proj_v(sampled)[0, :, 0]  # (dim, Nk)
        q = q[0].reshape(dim, H * W)
        qpos = query_grid(H, W, generation, torch.float64, x.device)
        kpos = pos[0].reshape(groups, Hk * Wk, 2)
        head_dim = dim // heads
        out = torch.zeros(dim, H * W, dtype=torch.float64)
        for m in range(heads):
            g = m // (heads // groups)
            rows = slice(m * head_dim, (m + 1) * head_dim)
            for i in range(H * W):
                scores = torch.tensor([
                    float((q[rows, i] * k[rows, j]).sum()) * module.scale + _bilinear_corners(
                        module.rpe_table[m], float(qpos[i, 0] - kpos[g, j, 0]) * 0.5,
                        float(qpos[i, 1] - kpos[g, j, 1]) * 0.5)
                    for j in range(Hk * Wk)], dtype=torch.float64)
                out[rows, i] = (scores.softmax(0)[None, :] * v[rows]).sum(1)
        brute = module.proj_out(out.reshape(1, dim, H, W))
    torch.testing.assert_close(expected_out, brute, atol=1e-10, rtol=0)


def test_reference_op_is_independent_of_query_blocking():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 50, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    kpos, qpos, rpe = torch.rand(2, 2, 9, 2) * 2 - 1, torch.rand(50, 2) * 2 - 1, torch.randn(4, 5, 7)
    whole = deformable_attention_reference(q, k, v, kpos, qpos, rpe, 0.3)
    blocked = deformable_attention_reference(q, k, v, kpos, qpos, rpe, 0.3, block_elements=4 * 2 * 9 * 7)
    torch.testing.assert_close(whole, blocked, atol=1e-6, rtol=0)


def test_grids_follow_each_generation_and_centre_single_pixels():
    dtype, cpu = torch.float64, torch.device('cpu')
    torch.testing.assert_close(reference_points(1, 4, 'dat', dtype, cpu)[0, :, 1],
                               torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=dtype))
    torch.testing.assert_close(reference_points(1, 3, 'dat_pp', dtype, cpu)[0, :, 1],
                               torch.tensor([-0.5, 0.5, 1.5], dtype=dtype))
    torch.testing.assert_close(query_grid(1, 3, 'dat_pp', dtype, cpu)[:, 1], torch.tensor([-1.0, 0.0, 1.0], dtype=dtype))
    torch.testing.assert_close(query_grid(1, 2, 'dat', dtype, cpu)[:, 1], torch.tensor([-0.5, 0.5], dtype=dtype))
    for generation in ('dat', 'dat_pp'):
        assert torch.equal(reference_points(1, 1, generation, dtype, cpu), torch.zeros(1, 1, 2, dtype=dtype))
        assert torch.equal(query_grid(1, 1, generation, dtype, cpu), torch.zeros(1, 2, dtype=dtype))


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_residual_depthwise_conv_is_x_plus_the_conv(memory_format):
    """The identity folded into the kernel's centre tap gives x + conv(x), and the gradients of that two-step
    form, with nn.Conv2d's parameters and state dict."""
    torch.manual_seed(0)
    conv = ResidualDepthwiseConv(6).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    two_step = x + F.conv2d(x, conv.weight, conv.bias, padding=1, groups=6)
    folded = conv(x)
    torch.testing.assert_close(folded, two_step, atol=1e-12, rtol=0)
    grad = torch.randn_like(folded)
    expected = torch.autograd.grad(two_step, (x, conv.weight, conv.bias), grad)
    for got, want in zip(torch.autograd.grad(folded, (x, conv.weight, conv.bias), grad), expected):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert conv.state_dict().keys() == torch.nn.Conv2d(6, 6, 3, padding=1, groups=6).state_dict().keys()
    # built on the meta device and materialised, it holds nothing but the loaded state dict
    materialised = ResidualDepthwiseConv(6, device='meta').to_empty(device='cpu').double()
    materialised.load_state_dict(conv.state_dict())
    torch.testing.assert_close(materialised(x), folded, atol=0, rtol=0)


@pytest.mark.parametrize('images', [1, 2, 5])
def test_dwconv_mlp_over_image_blocks_matches_the_whole_batch(images, monkeypatch):
    """Inference runs over blocks of at most `images` images, of equal size give or take one; a forward that
    records gradients, and TorchScript, run the whole batch; all give the same maps."""
    torch.manual_seed(0)
    mlp, x = DwConvMlp(4, 16).double(), torch.randn(5, 4, 6, 7, dtype=torch.float64)
    whole = mlp(x).detach()
    torch.testing.assert_close(torch.jit.script(mlp)(x), whole, atol=1e-12, rtol=0)
    monkeypatch.setattr(blocking, 'BLOCK_ELEMENTS', images * 16 * 6 * 7)
    seen = []
    original = mlp._mlp
    monkeypatch.setattr(mlp, '_mlp', lambda block: seen.append(block.shape[0]) or original(block))
    with torch.no_grad():
        blocked = mlp(x)
    torch.testing.assert_close(blocked, whole, atol=1e-12, rtol=0)
    assert sum(seen) == 5 and max(seen) <= images and max(seen) - min(seen) <= 1
