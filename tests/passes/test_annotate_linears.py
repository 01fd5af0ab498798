"""annotate_linears: roles from structure, smoothing groups, schemes, canonical forms, skips — and the graph
still computes what it computed before."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import by_name, dit_inputs, make_ctx, run_pass, tiny_dit
from torch import nn

import svdq_compiler
from svdq_compiler.fx_utils import aten
from svdq_compiler.ir import Role

BLOCK = "blocks.0."


def annotate(model, inputs, config="int4", **overrides):
    gm = svdq_compiler.capture(model, inputs)
    result = run_pass(gm, "annotate_linears", make_ctx(config, inputs, **overrides))
    torch.testing.assert_close(result.gm(*inputs), model(*inputs))
    return result.gm, by_name(result.gm), result.stats


def roles(infos):
    return {name: str(info.role) for name, info in infos.items()}


def test_dit_block_roles_groups_and_schemes():
    gm, infos, stats = annotate(tiny_dit(), dit_inputs())
    assert roles(infos) == {
        "embed": "embed", "cond1": "embed", "cond2": "embed", BLOCK + "ada": "adaln",
        BLOCK + "q": "qkv", BLOCK + "k": "qkv", BLOCK + "v": "qkv", BLOCK + "out": "out",
        BLOCK + "up": "mlp_up", BLOCK + "down": "mlp_down", "final": "final"}
    # q, k and v read one tensor: one smoothing group named after its first member.
    assert {infos[BLOCK + n].group for n in "qkv"} == {BLOCK + "q"}
    assert infos[BLOCK + "out"].group == BLOCK + "out"
    schemes = {name: info.scheme.describe() for name, info in infos.items()}
    assert schemes[BLOCK + "q"] == "W:int4/g64 A:int4/g64 +smooth +r32"
    assert schemes[BLOCK + "down"] == "W:int4/g64 A:uint4/g64 +smooth +r32"  # post-GELU: shifted unsigned
    assert infos[BLOCK + "down"].shift == pytest.approx(0.171875)
    assert schemes[BLOCK + "ada"] == "W:int4/g64 A:16 +smooth +r32"  # AWQ and a branch, where they pay
    assert {schemes[n] for n in ("embed", "cond1", "cond2", "final")} == {"fp16"}
    assert "embed" in infos["embed"].skip_reason and infos[BLOCK + "q"].skip_reason is None
    assert stats["roles"]["qkv"] == 3 and stats["smoothing_groups"] == 9
    # The annotation is printed with the IR.
    assert "# svdq: blocks.0.q role=qkv group=blocks.0.q" in svdq_compiler.ir.format_ir(gm)


def test_decomposed_attention_and_cross_attention():
    _, infos, _ = annotate(tiny_dit(manual_attention=True), dit_inputs())
    assert [str(infos[BLOCK + n].role) for n in ("q", "k", "v", "out")] == ["qkv", "qkv", "qkv", "out"]

    model = tiny_dit(context_dim=24)
    _, infos, _ = annotate(model, dit_inputs(context_dim=24))
    assert [str(infos[BLOCK + n].role) for n in ("q", "k", "v")] == ["qkv", "cross_kv", "cross_kv"]
    assert infos[BLOCK + "k"].group == infos[BLOCK + "v"].group == BLOCK + "k"
    assert infos[BLOCK + "k"].scheme.kind == "fp" and "cross_kv" in infos[BLOCK + "k"].skip_reason


class Canonical(nn.Module):
    """1×1 and 3×3 convolutions, addmm / mm / matmul with parameter weights, and a gated (SwiGLU) MLP."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.pw = nn.Conv2d(8, 64, 1)
        self.norm2 = nn.LayerNorm(64)
        self.w1 = nn.Parameter(torch.randn(128, 64) / 8)
        self.b1 = nn.Parameter(torch.randn(128) / 8)
        self.w2 = nn.Parameter(torch.randn(64, 64) / 8)
        self.w3 = nn.Parameter(torch.randn(64, 64) / 8)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        h = self.pw(self.norm(self.stem(x)))                 # [B, 64, H, W]
        tokens = self.norm2(h.flatten(2).transpose(1, 2))    # [B, HW, 64]
        flat = tokens.reshape(-1, 64)
        gate, up = torch.addmm(self.b1, flat, self.w1.t()).chunk(2, dim=-1)
        mixed = torch.mm(F.silu(gate) * up, self.w2.t())
        return self.head(torch.matmul(self.norm2(mixed), self.w3.t()))


def test_canonical_forms_convs_and_gated_mlp():
    torch.manual_seed(0)
    model, inputs = Canonical().eval(), (torch.randn(2, 8, 4, 4),)
    gm, infos, stats = annotate(model, inputs)
    assert stats["canonicalized"] == {"matmul_to_linear": 3, "conv1x1_to_linear": 1, "concat_linears_split": 0}
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.mm.default not in ops and aten.addmm.default not in ops and aten.matmul.default not in ops
    assert ops.count(aten.conv2d.default) == 1 and ops.count(aten.linear.default) == 5
    assert (infos["pw"].kind, infos["pw"].in_features, infos["pw"].out_features) == ("conv1x1", 8, 64)
    assert infos["stem"].kind == "conv" and infos["stem"].role == Role.CONV and infos["stem"].scheme.kind == "fp"
    assert str(infos["w1"].role) == "mlp_up"
    assert str(infos["w2"].role) == "mlp_down" and infos["w2"].shift == 0  # gated product: signed, no shift
    assert str(infos["head"].role) == "final"


class Concat(nn.Module):
    """Attention output ‖ GELU output → one projection, as in FLUX single blocks; plus one reused weight."""

    def __init__(self, dim=64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.embed = nn.Linear(dim, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Linear(dim, dim)
        self.proj = nn.Linear(2 * dim, dim)
        self.shared = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        h = self.norm(self.embed(x))
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        h = h + self.proj(torch.cat([attn, F.gelu(self.mlp(h))], dim=-1))
        h = self.shared(self.norm(h)) + self.shared(self.norm(2 * h))
        return self.head(self.norm(h))


def test_concat_linear_split_fused_qkv_and_shared_weight():
    torch.manual_seed(0)
    model, inputs = Concat().eval(), (torch.randn(2, 5, 64),)
    gm, infos, stats = annotate(model, inputs)
    assert stats["canonicalized"]["concat_linears_split"] == 1
    assert str(infos["proj.part0"].role) == "out" and str(infos["proj.part1"].role) == "mlp_down"
    assert infos["proj.part0"].shift == 0 and infos["proj.part1"].shift > 0
    assert infos["proj.part1"].bias == "proj.bias" and infos["proj.part0"].bias is None
    assert not hasattr(gm.proj, "weight")
    assert str(infos["qkv"].role) == "qkv"  # one linear feeding q, k and v
    # One weight called twice: one smoothing group across both inputs, counted once.
    assert infos["shared"].group == infos["shared@2"].group == "shared"
    assert stats["shared_weights"] == 1


def test_skip_patterns_padding_and_role_overrides():
    model, inputs = tiny_dit(), dit_inputs()
    _, infos, _ = annotate(model, inputs, skip=(r"\.k$",), role_schemes={"embed": "w4a4", "final": "fp",
                                                                           "adaln": "fp"})
    assert infos[BLOCK + "k"].scheme.kind == "fp" and "skip pattern" in infos[BLOCK + "k"].skip_reason
    assert infos["embed"].scheme.kind == "w4a4" and infos["embed"].pad_k == 48  # K=16 padded to one group of 64
    assert infos[BLOCK + "ada"].scheme.kind == "fp"
    _, infos, stats = annotate(model, inputs, role_schemes={"embed": "w4a4"}, pad_k=False)
    assert infos["embed"].scheme.kind == "fp" and "not a multiple of the group size 64" in infos["embed"].skip_reason
    assert stats["padded_k"] == []


def test_adapter_role_hints_override_structure(dit):
    model, inputs, gm = dit

    class Adapter:
        def role_hints(self, model):
            return {r"\.ada$": "embed"}

    ctx = make_ctx("int4", inputs)
    ctx.adapter = Adapter()
    infos = by_name(run_pass(gm, "annotate_linears", ctx).gm)
    assert infos[BLOCK + "ada"].role == Role.EMBED and "adapter hint" in infos[BLOCK + "ada"].role_reason


@pytest.mark.parametrize("preset", ["nvfp4", "w8a8", "w4a16-nf4", "w4a4-rtn"])
def test_preset_schemes(dit, preset):
    model, inputs, gm = dit
    infos = by_name(run_pass(gm, "annotate_linears", make_ctx(preset, inputs)).gm)
    expected = {"nvfp4": "W:nvfp4/g16 A:nvfp4/g16 +smooth +r32", "w8a8": "W:int8/g64 A:int8/g64 +smooth +r16",
                "w4a16-nf4": "W:nf4/g64 A:16", "w4a4-rtn": "W:int4/g64 A:int4/g64"}[preset]
    assert infos[BLOCK + "q"].scheme.describe() == expected
    # post-GELU inputs are shifted for the unsigned integer formats (uint4, uint8), not for signed FP4 or 16 bits
    assert infos[BLOCK + "down"].shift == (0.171875 if preset in ("w4a4-rtn", "w8a8") else 0)
    assert infos[BLOCK + "down"].scheme.describe().startswith("W:int8/g64 A:uint8/g64") == (preset == "w8a8")


class PairBiasedBlock(nn.Module):
    """Tokens [B, S, C] whose attention is biased by a pair map [B, S, S, P] (RFD4-Proteina's layout), modulated
    by a timestep embedding [B, C]."""

    def __init__(self, c=32, p=8, heads=2):
        super().__init__()
        self.heads = heads
        self.t_embed, self.t_mlp, self.ada = nn.Linear(16, c), nn.Linear(c, c), nn.Linear(c, 2 * c)
        self.pair = nn.Linear(p, heads)
        self.q, self.k, self.v, self.out = (nn.Linear(c, c) for _ in range(4))
        self.up, self.down = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.norm = nn.LayerNorm(c, elementwise_affine=False)

    def forward(self, x, pairs, t):
        scale, shift = self.ada(F.silu(self.t_mlp(F.silu(self.t_embed(t)))))[:, None].chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        bias = self.pair(pairs).permute(0, 3, 1, 2)
        q, k, v = (proj(h).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)
        x = x + self.out(a)
        return x + self.down(F.gelu(self.up(x)))


def test_pair_map_of_higher_rank_does_not_make_the_tokens_a_conditioning_path():
    """The token stream's rank is what the queries read (3 here), not the highest rank of any linear's input
    (the rank-4 pair map): out/up/down stay token linears, the timestep MLP stays the conditioning path."""
    torch.manual_seed(0)
    inputs = (torch.randn(2, 8, 32), torch.randn(2, 8, 8, 8), torch.randn(2, 16))
    _, infos, _ = annotate(PairBiasedBlock().eval(), inputs)
    assert roles(infos) == {"t_embed": "embed", "t_mlp": "embed", "ada": "adaln", "pair": "embed", "q": "qkv", "k": "qkv",
                            "v": "qkv", "out": "out", "up": "mlp_up", "down": "mlp_down"}


@pytest.mark.slow
def test_flux_roles_match_the_reference_recipe():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    inputs = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)
    gm = svdq_compiler.capture(model, inputs)
    gm = run_pass(gm, "annotate_linears", make_ctx("int4", inputs)).gm
    torch.testing.assert_close(gm(**inputs)[0], model(**inputs)[0])
    infos = by_name(gm)
    by_role = {}
    for name, info in infos.items():
        by_role.setdefault(str(info.role), set()).add(name)
    double, single = "transformer_blocks.0.", "single_transformer_blocks.0."
    assert by_role["adaln"] == {double + "norm1.linear", double + "norm1_context.linear", single + "norm.linear"}
    assert by_role["final"] == {"norm_out.linear", "proj_out"}
    assert {n for n in by_role["embed"] if "time_text_embed" not in n} == {"x_embedder", "context_embedder"}
    assert by_role["qkv"] == {double + f"attn.{p}" for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                              "add_v_proj")} | {single + f"attn.to_{p}" for p in "qkv"}
    assert by_role["out"] == {double + "attn.to_out.0", double + "attn.to_add_out", single + "proj_out.part0"}
    assert by_role["mlp_down"] == {double + "ff.net.2", double + "ff_context.net.2", single + "proj_out.part1"}
    # The single block's q, k, v and proj_mlp read one normalized input: one smoothing group (as the reference).
    assert len({infos[single + n].group for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}) == 1


def test_annotate_linears_alone_on_a_hand_built_mlp():
    """Before: x @ Wᵀ (aten.t + aten.matmul), a LayerNorm'd GELU MLP with a residual, a final linear.
    Expected: the matmul is an aten.linear; the roles embed (reads the graph input), mlp_up (feeds the GELU),
    mlp_down (reads it: unsigned activations) and final (feeds the output), the int4 preset's schemes, one
    group per linear; the same function."""
    from hand_built import ProjectedMlp, context, run_one
    from torch.testing import FileCheck

    import svdq_compiler
    from svdq_compiler.ir import format_ir

    torch.manual_seed(0)
    model, x = ProjectedMlp().eval(), torch.randn(8, 64)
    gm = svdq_compiler.capture(model, (x,), dynamic_shapes=None)
    gm = run_one(gm, context(available=()), "annotate_linears")
    FileCheck().check("# svdq: w role=embed group=w scheme=fp16 skip=role embed is kept 16-bit") \
        .check("linear_default = torch.ops.aten.linear.default(x, w, None)").check("aten.layer_norm") \
        .check("# svdq: fc1 role=mlp_up group=fc1 scheme=W:int4/g64 A:int4/g64 +smooth +r32") \
        .check("torch.ops.aten.linear.default(layer_norm, fc1_weight, fc1_bias)").check("aten.gelu") \
        .check("# svdq: fc2 role=mlp_down group=fc2 scheme=W:int4/g64 A:uint4/g64 +smooth +r32") \
        .check("torch.ops.aten.linear.default(gelu, fc2_weight, fc2_bias)") \
        .check("# svdq: out role=final group=out scheme=fp16").check("linear.default(add, out_weight, out_bias)") \
        .run(format_ir(gm))
    FileCheck().check_not("aten.matmul").check_not("aten.t.default").run(format_ir(gm))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
