"""The auto adapter: any diffusers denoiser without a family adapter gets inputs from its forward signature and
config, and its dynamic dimensions are found by rebuilding the inputs one size larger; a sample of the coverage
benchmark (tools/bench_coverage.py) runs here, every class under -m slow."""

import json
import sys
from pathlib import Path

import pytest
import torch

import svdq_compiler
from eager_models import Wobbly
from svdq_compiler.capture import CAPTURE_META
from svdq_compiler.errors import InputError
from svdq_compiler.models import DiffusersAdapter, adapter_for, load_model
from svdq_compiler.models.auto import denoiser_classes, plan_inputs, text_widths, tiny_config
from svdq_compiler.models.base import Sizes, infer_dims

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_coverage import cover  # noqa: E402


def build_known_layout(sizes: Sizes) -> dict:
    """Inputs whose dimensions follow known sizes, plus two that must stay static."""
    b, t, r, c, f = sizes.batch, sizes.text, sizes.rows, sizes.cols, sizes.frames
    return {
        "packed": torch.zeros(b, r * c, 16),  # batch, image tokens
        "ids": torch.zeros(r * c, 3),  # image tokens
        "text": torch.zeros(b, t, 48),  # batch, text tokens
        "latent": torch.zeros(b, 4, 2 * r, 2 * c),  # batch, height and width in steps of 2
        "video": torch.zeros(b, 4, f, r, c),  # frames
        "offset": torch.zeros(2 * r + 1),  # moves with rows, but not in proportion: static
        "flag": False,
        "nested": {"embeds": torch.zeros(b, 8)},  # batch, inside a dict
    }


def test_infer_dims_finds_what_each_dimension_follows():
    dims = infer_dims(build_known_layout, Sizes(batch=2, text=8, rows=5, cols=7, frames=3))
    found = {(name, index): (dim.name, dim.multiple) for name, entry in dims.items() if entry and name != "nested"
             for index, dim in entry.items()}
    expected = {
        ("packed", 0): ("batch", 1), ("packed", 1): ("image_tokens", 1), ("ids", 0): ("image_tokens", 1),
        ("text", 0): ("batch", 1), ("text", 1): ("text_tokens", 1),
        ("latent", 0): ("batch", 1), ("latent", 2): ("height", 2), ("latent", 3): ("width", 2),
        ("video", 0): ("batch", 1), ("video", 2): ("frames", 1), ("video", 3): ("height", 1),
        ("video", 4): ("width", 1),
    }
    assert found == expected
    assert dims["nested"]["embeds"][0].name == "batch" and dims["offset"] is None and dims["flag"] is None
    assert "latent height" in dims["latent"][2].why and "multiple 2" in dims["latent"][2].why


def tiny(class_name):
    import diffusers

    cls = getattr(diffusers, class_name)
    torch.manual_seed(0)
    return cls(**tiny_config(cls)).eval()


def test_tiny_config_shrinks_sizes_not_structure():
    config = tiny_config(getattr(__import__("diffusers"), "ChromaTransformer2DModel"))
    assert config["num_layers"] == 1 and config["num_single_layers"] == 1
    assert config["num_attention_heads"] == 2 and config["attention_head_dim"] == 32
    assert config["joint_attention_dim"] == 64 and sum(config["axes_dims_rope"]) == 32
    assert "in_channels" not in config and "patch_size" not in config


@pytest.mark.parametrize("class_name, layout, roles", [
    ("ChromaTransformer2DModel", "tokens", {"hidden_states": "latent", "encoder_hidden_states": "text",
                                            "timestep": "timestep", "img_ids": "image_ids", "txt_ids": "text_ids"}),
    ("UNet2DModel", "image", {"sample": "latent", "timestep": "timestep"}),
    ("WanTransformer3DModel", "video", {"hidden_states": "latent", "timestep": "timestep",
                                        "encoder_hidden_states": "text"}),
])
def test_inputs_from_the_forward_signature_and_config(class_name, layout, roles):
    model = tiny(class_name)
    adapter = adapter_for(model)
    assert isinstance(adapter, DiffusersAdapter)
    plan = plan_inputs(model)
    assert plan.choice.layout == layout and plan.parameters == roles
    inputs = adapter.example_inputs(model, batch=2, tokens=(4, 6))
    assert adapter.tokens_of(model, inputs) == (4, 6)
    with torch.no_grad():
        model(**inputs)


def test_a_model_that_takes_square_grids_only_gets_a_square_plan():
    """DiT unpatchifies with height = width = √tokens: on a 2×3 grid it runs by folding the rest into the batch,
    which the probe refuses (the output must lead with the batch), so its plan is square."""
    model = tiny("DiTTransformer2DModel")
    adapter = adapter_for(model)
    plan = plan_inputs(model)
    assert plan.square and adapter.square_grid(model)
    inputs = adapter.example_inputs(model, batch=2)
    assert inputs["hidden_states"].shape[-1] == inputs["hidden_states"].shape[-2]
    assert adapter.example_inputs(model, batch=2, tokens=16)["hidden_states"].shape[-2:] == (8, 8)  # patch 2
    with pytest.raises(InputError, match=r"takes square latent grids only, not 4x6"):
        adapter.example_inputs(model, batch=2, tokens=(4, 6))
    assert not plan_inputs(tiny("UNet2DModel")).square


def test_a_probe_refuses_an_output_that_does_not_lead_with_the_batch():
    from svdq_compiler.models.base import runs_on

    class FoldsIntoTheBatch(torch.nn.Module):
        def forward(self, x):
            return (x.reshape(-1, 2, x.shape[-1]),)

    assert runs_on(FoldsIntoTheBatch(), {"x": torch.zeros(2, 4, 3)}) is None  # no batch expected
    assert runs_on(FoldsIntoTheBatch(), {"x": torch.zeros(2, 4, 3)}, batch=2) == \
        "its output [4, 2, 3] does not lead with the batch 2 of its inputs"

    class PerSample(torch.nn.Module):  # Z-Image's output: a list with one tensor per sample
        def forward(self, x):
            return (list(x.unbind(0)),)

    assert runs_on(PerSample(), {"x": torch.zeros(2, 4, 3)}, batch=2) is None
    assert runs_on(PerSample(), {"x": torch.zeros(3, 4, 3)}, batch=2) == \
        "its output [3, 4, 3] does not lead with the batch 2 of its inputs"

    class OneOutputInAList(torch.nn.Module):  # a list of outputs, not of samples: the tensor's batch counts
        def forward(self, x):
            return [x * 2]

    assert runs_on(OneOutputInAList(), {"x": torch.zeros(2, 4, 3)}, batch=2) is None
    # given the latent's shape, an output of another shape is refused too (a latent split the model does not take)
    assert runs_on(OneOutputInAList(), {"x": torch.zeros(2, 4, 3)}, batch=2, shape=(2, 4, 6)) == \
        "its output [2, 4, 3] is not of the latent's shape [2, 4, 6]"


def test_required_input_without_a_known_layout_is_a_clear_error():
    model = Wobbly()
    with pytest.raises(InputError, match="wobble.*pass your own example_inputs"):
        adapter_for(model).example_inputs(model)


def test_the_enumeration_finds_transformers_and_unets():
    classes = denoiser_classes()
    assert {"FluxTransformer2DModel", "HiDreamImageTransformer2DModel", "Lumina2Transformer2DModel",
            "UNet2DConditionModel", "UNet2DModel"} <= set(classes)
    assert "AutoencoderKL" not in classes
    assert "MotionAdapter" not in classes  # its forward is annotated to return None: it computes nothing


def test_compile_a_folder_of_a_class_without_adapter(tmp_path, capsys):
    """svdq-compile FOLDER on an unknown class: captured with inferred dynamic dims, runs at another grid."""
    from svdq_compiler.cli import compile_main

    model = tiny("ChromaTransformer2DModel")
    model.save_pretrained(tmp_path / "chroma")
    out, report = tmp_path / "g.pt", tmp_path / "r.json"
    assert compile_main([str(tmp_path / "chroma"), "--out", str(out), "--report", str(report), "--calib-prompts", "1",
                         "--calib-steps", "1", "--set", "smooth_grid=2"]) == 0
    dims = {(d["input"], d["index"]): d for d in json.loads(report.read_text())["capture"]["dims"]}
    assert dims[("hidden_states", 1)]["status"] == "dynamic" and dims[("img_ids", 0)]["name"] == "image_tokens"
    assert "moved with rows and cols" in dims[("hidden_states", 1)]["why_dynamic"]
    assert dims[("encoder_hidden_states", 1)]["name"] == "text_tokens"
    graph = svdq_compiler.load(out)
    loaded = load_model(tmp_path / "chroma")
    adapter = adapter_for(loaded)
    inputs = adapter.example_inputs(loaded, batch=2, tokens=(6, 4), seed=3)  # not the captured grid
    with torch.no_grad():
        want, got = loaded(**inputs)[0], graph(**inputs)[0]
    assert got.shape == want.shape
    assert float((got - want).norm() / want.norm()) < 0.1


def coverage_case(class_name, presets=("int4",), calibration=(1, 1)):
    module = denoiser_classes()[class_name]
    entry = cover(class_name, module, presets=presets, calibration=calibration)
    assert entry["failure"] is None, entry["failure"]
    assert entry["reached"] == "run" and entry["path"] in ("graph", "eager")
    for preset in presets:
        result = entry["presets"][preset]
        assert result["quantized_linears"] > 0
        assert len(result["rel_error"]) == 2 and all(0 < error < 0.2 for error in result["rel_error"])
    return entry


def test_coverage_sample():
    """One class of the benchmark in the default suite: a 3-D video transformer with no adapter."""
    entry = coverage_case("WanTransformer3DModel")
    assert entry["path"] == "graph"
    assert {"batch", "frames", "height", "width", "text_tokens"} <= set(entry["dynamic"])


@pytest.mark.parametrize("class_name", ["HiDreamImageTransformer2DModel", "Lumina2Transformer2DModel"])
def test_classes_torch_export_cannot_capture_compile_eagerly_from_a_tiny_config(class_name):
    """Issue 19's two classes, with no adapter and no hand-written inputs: the auto adapter builds them
    (HiDream's stacked llama3 text input included), capture fails on their data-dependent code, the eager path
    compiles them, and they run at two latent grids."""
    entry = coverage_case(class_name)
    assert entry["adapter"] == "auto" and entry["path"] == "eager"
    assert entry["path_reason"].startswith("torch.export failed"), entry["path_reason"]
    assert entry["grids"][0] != entry["grids"][1]
    recorded = next(e for e in COVERED["classes"] if e["class"] == class_name)  # and the benchmark's result says so
    assert recorded["reached"] == "run" and recorded["path"] == "eager"
    assert all(len(preset["rel_error"]) == 2 for preset in recorded["presets"].values())


COVERED = json.loads((Path(__file__).resolve().parents[1] / "bench/results/coverage-diffusers.json").read_text()) \
    if (Path(__file__).resolve().parents[1] / "bench/results/coverage-diffusers.json").exists() else {"classes": []}


@pytest.mark.slow
@pytest.mark.parametrize("class_name", [e["class"] for e in COVERED["classes"] if e.get("reached") == "run"])
def test_coverage_of_every_class_the_benchmark_ran(class_name):
    coverage_case(class_name, presets=("int4", "w4a4-rtn"), calibration=(2, 2))


def test_pipeline_inputs_are_given_only_where_the_adapter_failed_and_the_failure_is_kept():
    """The benchmark calls four classes as their pipelines do (tools/coverage_inputs.py); each entry keeps the
    auto adapter's own refusal, and each ran at two sizes."""
    from coverage_inputs import GIVEN_INPUTS

    given = {e["class"]: e for e in COVERED["classes"] if e.get("inputs_given")}
    assert sorted(given) == sorted(GIVEN_INPUTS)
    for entry in given.values():
        assert entry["adapter"] == "auto" and entry["class"] in entry["inputs_given"]["adapter_error"]
        assert entry["reached"] == "run" and entry["grids"][0] != entry["grids"][1]
        assert all(len(preset["rel_error"]) == 2 for preset in entry["presets"].values())


def test_readme_table_is_the_coverage_result():
    """The README's coverage table is `bench_coverage.py --table` of the committed result, not edited by hand."""
    from bench_coverage import markdown

    assert markdown(COVERED) in (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_table_says_which_classes_a_cut_short_rerun_left_at_earlier_results():
    from bench_coverage import markdown, summary

    entries = [{"class": name, "failure": {"stage": "inputs", "error": "x"}, "reached": "build"}
               for name in ("A", "B", "C")]
    report = {"presets": ["int4"], "summary": summary(entries), "classes": entries,
              "runs": [{"classes": ["A", "B", "C"], "complete": True},
                       {"classes": ["A", "B"], "complete": False, "done": ["A"]}]}
    assert markdown(report).startswith("3 classes (the last run, over 2 of them, was cut short after 1; the rest "
                                       "are earlier results)")
    del report["runs"][-1]["done"]
    assert markdown(report).startswith("3 classes (the last run, over 2 of them, was cut short; the rest")
    report["runs"][-1] = {"classes": ["A", "B"], "complete": True, "done": ["A", "B"]}
    assert markdown(report).startswith("3 classes (the last run reran 2 of them; the rest are earlier results)")
    report["runs"] = [{"classes": ["A", "B", "C", "D"], "complete": False, "done": ["A", "B", "C"]}]
    assert markdown(report).startswith("3 classes of 4 (the run was cut short)")


def test_tiny_configs_build_where_the_constructor_defaults_do_not():
    """The constructor judges each candidate: a wider model where a head size the config does not name must
    divide the width (Kandinsky 6: the sum of its RoPE axes, 128); a list of layer indices cut to the one layer
    (WanVACE); a None patch size left None where filling it selects a variant with no forward
    (Transformer2DModel's continuous input)."""
    import diffusers

    assert tiny_config(diffusers.Kandinsky6Transformer3DModel)["model_dim"] == 128
    assert tiny_config(diffusers.WanVACETransformer3DModel)["vace_layers"] == [0]
    config = tiny_config(diffusers.Transformer2DModel)
    assert "patch_size" not in config and config["in_channels"] == 16
    for name in ("Kandinsky6Transformer3DModel", "WanVACETransformer3DModel", "Transformer2DModel"):
        tiny(name)


@pytest.mark.parametrize("class_name, expect", [
    # frames before channels, scalar conditions counted from the config (total width / width of one)
    ("UNetSpatioTemporalConditionModel", {"sample": (2, 2, 8, 8, 12), "added_time_ids": (2, 1)}),
    # a pooled input [B, 1, C] whose width the config names after it (clip_text_pooled_in_channels)
    ("StableCascadeUNet", {"clip_text_pooled": (2, 1, 64)}),
    ("ErnieImageTransformer2DModel", {"text_lens": (2,)}),  # per-sample text lengths
    # text and image positions in one (8 text tokens, then the 4×6 grid), and text with its encoder layers per
    # token [B, T, num_text_layers, C]
    ("Krea2Transformer2DModel", {"position_ids": (8 + 24, 3), "encoder_hidden_states": (2, 8, 1, 64)}),
    # a second text encoder's mask, and image encoder tokens whose width the config names (image_embed_dim)
    ("HunyuanVideo15Transformer3DModel", {"encoder_attention_mask_2": (2, 8), "image_embeds": (2, 4, 64)}),
    # an optional control video the model cannot run without, on the latent's grid with the config's channels
    ("WanVACETransformer3DModel", {"hidden_states": (2, 16, 2, 8, 12), "control_hidden_states": (2, 64, 2, 8, 12)}),
    # an image encoder's pooled embedding in the cross-attention width, beside the first frame's latent
    ("I2VGenXLUNet", {"image_embeddings": (2, 64), "image_latents": (2, 4, 2, 8, 12)}),
    # an autoregressive prior's token per latent token, and which samples drop it
    ("GlmImageTransformer2DModel", {"prior_token_id": (2, 24), "prior_token_drop": (2,)}),
    # a latent stream concatenated with the latent on the channel axis: the two share in_channels (192), and the
    # latent's share is the config width whose output has the latent's shape (64)
    ("AceStepTransformer1DModel", {"hidden_states": (2, 24, 64), "context_latents": (2, 24, 128)}),
    # a video U-Net cross-attending per frame: its text batch is batch × frames
    ("UNetMotionModel", {"sample": (2, 4, 2, 8, 12), "encoder_hidden_states": (2 * 2, 8, 64)}),
    # conditioning aligned with a sequence latent [B, C, L]: one text token per latent position
    ("MiniMaxMusic3Transformer1DModel", {"hidden_states": (2, 128, 4), "encoder_hidden_states": (2, 4, 64)}),
    # a second text encoder's input and mask at the width and length the config names with its suffix
    # (cross_attention_dim_t5, text_len_t5 shrunk to 8), the image's sizes in one [B, 6], and a style index
    ("HunyuanDiT2DModel", {"encoder_hidden_states_t5": (2, 8, 2048), "text_embedding_mask_t5": (2, 8),
                           "image_meta_size": (2, 6), "style": (2,)}),
    # earlier frames as latent streams, each with its frame indices, given as the model does not run without them;
    # the latent frames' own indices (HunyuanVideo-Framepack)
    ("HunyuanVideoFramepackTransformer3DModel", {"indices_latents": (2,), "latents_clean": (2, 16, 2, 8, 12),
                                                 "latents_history_4x": (2, 16, 2, 8, 12)}),
    # no grid: one vector per sample, conditioned on an embedding at the config's embedding_dim, and text of the
    # length the positions cover (num_embeddings, shrunk to 8)
    ("PriorTransformer", {"hidden_states": (2, 64), "proj_embedding": (2, 64), "encoder_hidden_states": (2, 8, 64)}),
    # a text-then-image-slots mask, each slot 2 × 2 latent tokens: a 4 × 6 grid of slots is 96 tokens
    ("QwenImage21Transformer2DModel", {"hidden_states": (2, 96, 64), "img_mask": (2, 8 + 24)}),
    # a sequence in steps of 4: its mid block halves the sequence once more than its two levels count
    ("UNet1DModel", {"sample": (2, 2, 16)}),
    # channels from the docstring's shape, `2 * in_visual_dim + 1`; a grid in steps of 8 (attention over 8 × 8
    # blocks), found square at first and given non-square grids back
    ("Kandinsky6SRTransformer3DModel", {"hidden_states": (2, 2, 32, 48, 129)}),
])
def test_inputs_named_by_rules_the_classes_share(class_name, expect):
    model = tiny(class_name)
    inputs = adapter_for(model).example_inputs(model, batch=2, tokens=(4, 6))
    assert {name: tuple(inputs[name].shape) for name in expect} == expect
    with torch.no_grad():
        model(**inputs)


def test_tiny_configs_give_up_what_keeps_them_from_running():
    """Where the tiny config that builds does not run on its inputs, the first of its relaxations that does: a
    `has_*` part the forward calls whatever the flag (Framepack), a zero `extra_*` width (UNet1D's first block takes
    the timestep embedding it concatenates), all U-Net levels and two blocks each (Kandinsky 3 pairs its levels with
    four settings of its own, and its up blocks reach their width in their second block). A model that runs as
    shrunk gives nothing up (UNet2DModel: two of its four levels)."""
    import diffusers

    assert tiny_config(diffusers.UNet1DModel)["extra_in_channels"] == 64
    config = tiny_config(diffusers.Kandinsky3UNet)
    assert len(config["block_out_channels"]) == 4 and config["layers_per_block"] == 2
    config = tiny_config(diffusers.HunyuanVideoFramepackTransformer3DModel)
    assert config["has_image_proj"] and config["has_clean_x_embedder"]
    assert config["num_layers"] == 1  # only the flags given up
    assert len(tiny_config(diffusers.UNet2DModel)["block_out_channels"]) == 2
    model = tiny("Kandinsky3UNet")
    with torch.no_grad():
        model(**adapter_for(model).example_inputs(model, batch=2))


def test_channels_last_latents_with_their_grid_and_text_positions():
    """Kandinsky 5 takes its latent channels last, [B, F, H, W, C], the positions along each axis of the patched
    grid as a list of three aranges and the text positions as one; those lists are tensors, not sizes held as
    constants. Kandinsky 6's `visual_cond` adds the conditioning frames and their mask to the latent: 2·C + 1."""
    model = tiny("Kandinsky5Transformer3DModel")
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model, batch=2, tokens=(4, 6))
    assert tuple(inputs["hidden_states"].shape) == (2, 2, 8, 12, model.config.in_visual_dim)
    assert [p.tolist() for p in inputs["visual_rope_pos"]] == [list(range(2)), list(range(4)), list(range(6))]
    assert inputs["text_rope_pos"].tolist() == list(range(inputs["encoder_hidden_states"].shape[1]))
    assert adapter.tokens_of(model, inputs) == (4, 6) and adapter.sizes_in_values(model, inputs) == []
    with torch.no_grad():
        model(**inputs)
    conditioned = tiny("Kandinsky6Transformer3DModel")
    assert conditioned.config.visual_cond
    inputs = adapter_for(conditioned).example_inputs(conditioned, batch=2, tokens=(4, 6))
    assert inputs["hidden_states"].shape[-1] == 2 * conditioned.config.in_visual_dim + 1
    with torch.no_grad():
        conditioned(**inputs)


def test_packed_video_tokens_take_their_grid_as_python_values():
    """LTX-Video takes its latent packed as [B, frames·rows·cols, C] and the grid it was packed from as Python
    ints: the adapter gives them, and reads the grid back from them (a factorization of the count would not be
    the model's grid)."""
    model = tiny("LTXVideoTransformer3DModel")
    adapter = adapter_for(model)
    assert plan_inputs(model).choice.layout == "video_tokens"
    inputs = adapter.example_inputs(model, batch=2, tokens=(4, 6))
    assert (inputs["num_frames"], inputs["height"], inputs["width"]) == (2, 4, 6)
    assert inputs["hidden_states"].shape[:2] == (2, 2 * 4 * 6)
    assert adapter.sizes_of(model, inputs) == Sizes(batch=2, text=inputs["encoder_hidden_states"].shape[1],
                                                    rows=4, cols=6, frames=2)
    assert set(adapter.sizes_in_values(model, inputs)) == {"num_frames", "height", "width"}
    with torch.no_grad():
        assert model(**inputs)[0].shape == inputs["hidden_states"].shape


def test_required_text_without_a_configured_width_takes_the_model_width():
    """AceStep's config leaves encoder_hidden_size None (its constructor then uses hidden_size) and its forward
    requires encoder_hidden_states: the text is built at the model's width; a model whose text input is optional
    and has no width in its config gets none."""
    model = tiny("AceStepTransformer1DModel")
    assert model.config["encoder_hidden_size"] is None
    assert text_widths(model) == [model.config["hidden_size"]]
    assert text_widths(tiny("UNet2DModel")) == []


def test_sizes_passed_as_python_values_are_found():
    """Qwen-Image takes its latent grid as Python ints (img_shapes): a captured graph would hold them constant,
    so svdq_compiler.compile takes the eager path for it."""
    model = tiny("QwenImageTransformer2DModel")
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model, batch=2, tokens=(4, 6))
    assert inputs["img_shapes"] == [(1, 4, 6)] * 2
    assert adapter.sizes_in_values(model, inputs) == ["img_shapes"]
    assert adapter.sizes_in_values(tiny("WanTransformer3DModel"), {}) == []


def test_a_grid_the_graph_pins_but_the_model_does_not_takes_the_eager_path():
    from eager_models import NativeGridModel

    torch.manual_seed(0)
    model = NativeGridModel().eval()
    adapter = adapter_for(model)
    example = adapter.example_inputs(model, batch=2, tokens=(20, 30))
    compiled = svdq_compiler.compile(model, example, "w4a4-rtn", calib_inputs=[example])
    report = compiled.svdq_eager.report
    assert report["path"] == "eager" and "pins hidden_states dim 2 (latent height)" in report["path_reason"]
    other = adapter.example_inputs(model, batch=2, tokens=(13, 9), seed=1)
    with torch.no_grad():
        assert compiled(**other)[0].shape == (2, 4, 13, 9)


def test_probing_leaves_no_fake_tensor_in_a_models_tensor_cache():
    """A model caching the tables it builds (diffusers' lru_cache_unless_export, as LongCat-Audio's rotary
    embedding does) skips its cache while probed under fake tensors, so its real runs afterwards get real
    tables (before: the fake ones, and a DataDependentOutputException when calibrating)."""
    torch_utils = pytest.importorskip("diffusers.utils.torch_utils")
    if not hasattr(torch_utils, "lru_cache_unless_export"):
        pytest.skip("this diffusers has no lru_cache_unless_export")
    from torch._subclasses.fake_tensor import FakeTensor

    from svdq_compiler.models.base import runs_on

    class CachedTable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        @torch_utils.lru_cache_unless_export(maxsize=4)
        def table(self, length: int) -> torch.Tensor:
            return torch.arange(length, dtype=torch.float32)[:, None].expand(length, 8).contiguous()

        def forward(self, x):
            return self.proj(x) + self.table(x.shape[1])

    model, inputs = CachedTable(), {"x": torch.randn(2, 5, 8)}
    assert runs_on(model, inputs) is None
    out = model(**inputs)
    assert not isinstance(out, FakeTensor) and torch.isfinite(out).all()
    assert not torch.compiler.is_compiling()


def test_probing_leaves_no_fake_tensor_in_a_helper_objects_cache():
    """A model whose plain helper object caches the table it builds on first use (Bria-Fibo 2's RopeEmbedder, no
    nn.Module, no buffer) gets that cache undone after a probe under fake tensors, so its real runs build a real
    table (before: the fake one, and every layout failed)."""
    from torch._subclasses.fake_tensor import FakeTensor

    from svdq_compiler.models.base import runs_on

    class TableOnFirstUse:
        def __init__(self):
            self.table = None

        def __call__(self, length: int) -> torch.Tensor:
            if self.table is None:
                self.table = torch.arange(16, dtype=torch.float32)[:, None].expand(16, 8).contiguous()
            return self.table[:length]

    class CachedByHelper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.positions = TableOnFirstUse()

        def forward(self, x):
            return self.proj(x) + self.positions(x.shape[1])

    model, inputs = CachedByHelper(), {"x": torch.randn(2, 5, 8)}
    assert runs_on(model, inputs) is None
    assert model.positions.table is None
    assert not isinstance(model(**inputs), FakeTensor)


def test_text_in_bundles_with_the_count_the_docstring_computes_from_the_config():
    """Bria-Fibo 2 documents its text as `(batch_size, 1 + len(injection_layer_ids), text_len, cap_feat_dim)`: one
    bundle for its resampler and one per injection block, given as [B, L, T, C]."""
    model = tiny("BriaFibo2Transformer2DModel")
    assert plan_inputs(model).choice.bundled
    inputs = adapter_for(model).example_inputs(model, batch=2, tokens=(4, 6))
    bundles = 1 + len(model.config.injection_layer_ids)
    assert tuple(inputs["encoder_hidden_states"].shape) == (2, bundles, 8, model.config.cap_feat_dim)
    with torch.no_grad():
        assert model(**inputs)[0].shape == inputs["hidden_states"].shape


class ResizesWithAnOptionalDependency(torch.nn.Module):
    """Cosmos's shape: a flag, on by default, whose branch calls a module its file imports only where an optional
    dependency is installed (torchvision's `transforms`), absent here."""

    def __init__(self, in_channels: int = 4, concat_mask: bool = True, learnable: bool = True):
        super().__init__()
        self.config = {"concat_mask": concat_mask, "learnable": learnable}
        self.proj = torch.nn.Linear(in_channels + concat_mask, 8)

    def forward(self, hidden_states, mask=None):
        if self.config.concat_mask:
            mask = not_installed_transforms.resize(mask)  # noqa: F821
            hidden_states = torch.cat([hidden_states, mask], dim=-1)
        if self.config.learnable:
            hidden_states = hidden_states * torch.ones(1)
        return self.proj(hidden_states)


def test_a_flag_whose_branch_needs_an_absent_optional_dependency_is_off_in_the_tiny_config():
    from svdq_compiler.models.auto import flags_needing_missing_modules

    assert flags_needing_missing_modules(ResizesWithAnOptionalDependency) == {"concat_mask": False}
    assert tiny_config(ResizesWithAnOptionalDependency)["concat_mask"] is False


def test_required_inputs_the_model_runs_without_are_given_none_and_positions_count_its_own_tokens():
    """OmniGen requires input_ids, input_image_sizes and attention_mask, which no rule explains; its code skips the
    multimodal conditioning when they are None, so they are given None. Its position_ids number the joint sequence
    per sample, its time token first: [B, 1 + rows·cols]."""
    model = tiny("OmniGenTransformer2DModel")
    plan = plan_inputs(model)
    assert {name for name, role in plan.parameters.items() if role == "none"} == {"input_ids", "input_image_sizes",
                                                                                   "attention_mask"}
    inputs = adapter_for(model).example_inputs(model, batch=2, tokens=(4, 6))
    assert inputs["input_ids"] is None
    assert torch.equal(inputs["position_ids"], torch.arange(1 + 4 * 6).repeat(2, 1))
    with torch.no_grad():
        assert model(**inputs)[0].shape == inputs["hidden_states"].shape


def test_a_packed_sequence_of_tagged_tokens_with_per_sample_positions():
    """Ideogram 4 packs text and image tokens in one sequence: its text width is the config entry its docstring
    names (`llm_features_dim`), one text token per latent token; each token's kind is the module constant its
    docstring names for images (OUTPUT_IMAGE_INDICATOR); segment_ids put each row in one sample; position_ids are
    per sample [B, rows·cols, 3]; its MRoPE sections, a quarter of the head, are scaled to a quarter of the tiny
    one."""
    from diffusers.models.transformers import transformer_ideogram4

    model = tiny("Ideogram4Transformer2DModel")
    assert sum(model.config.mrope_section) == model.config.attention_head_dim // 4
    inputs = adapter_for(model).example_inputs(model, batch=2, tokens=(4, 6))
    assert tuple(inputs["encoder_hidden_states"].shape) == (2, 24, model.config.llm_features_dim)
    assert torch.equal(inputs["indicator"], torch.full((2, 24), transformer_ideogram4.OUTPUT_IMAGE_INDICATOR))
    assert torch.equal(inputs["segment_ids"], torch.zeros(2, 24, dtype=torch.long))
    assert tuple(inputs["position_ids"].shape) == (2, 24, 3)
    with torch.no_grad():
        assert model(**inputs)[0].shape == inputs["hidden_states"].shape


def test_a_packed_sequence_of_streams_placed_by_their_indices():
    """MiniMax H3 packs video, audio and text rows in one sequence: each `<modality>_indices` places the rows of the
    input whose docstring names it, token_tags tags each row as its docstring numbers the modalities, one distinct
    timestep serves every row (timestep_indices 0), and the video latent is its patches (`in_channels *
    prod(patch_size)` wide). A sequence whose length sums the streams' takes the eager path; its tiny RoPE rotates
    the share of the head the default does (rope_freq_dim scaled with the head)."""
    model = tiny("MiniMaxH3Transformer3DModel")
    assert 6 * model.config.rope_freq_dim == 3 * model.config.attention_head_dim // 4
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model, batch=2, tokens=(4, 6))
    video, audio, text = 24, inputs["audio_hidden_states"].shape[1], inputs["encoder_hidden_states"].shape[1]
    assert inputs["hidden_states"].shape[-1] == model.config.in_channels * 4
    assert torch.equal(torch.cat([inputs["video_indices"], inputs["audio_indices"], inputs["text_indices"]]),
                       torch.arange(video + audio + text))
    assert torch.equal(inputs["token_tags"], torch.tensor([0] * video + [2] * audio + [1] * text))
    assert tuple(inputs["timestep"].shape) == (1,) and not inputs["timestep_indices"].any()
    assert "video_indices" in adapter.sizes_in_values(model, inputs)
    with torch.no_grad():
        assert model(**inputs)[0].shape == inputs["hidden_states"].shape


def test_rotary_tables_the_pipeline_builds_from_the_grid_are_given_in_the_form_the_model_applies():
    """A required `*_rotary_emb` is a table over the latent's tokens that the model only applies, its form probed:
    Lumina-Next slices its patch grid from a complex polar table [rows, cols, head/2] (and unpacks its
    cross_attention_kwargs, given empty); Sana-WM's refiner takes LTX-2's interleaved (cos, sin), each
    [B, tokens, heads·head]."""
    model = tiny("LuminaNextDiT2DModel")
    inputs = adapter_for(model).example_inputs(model, batch=2, tokens=(4, 6))
    table = inputs["image_rotary_emb"]
    head = model.config.hidden_size // model.config.num_attention_heads
    assert table.is_complex() and tuple(table.shape) == (4, 6, head // 2)
    assert inputs["cross_attention_kwargs"] == {}
    with torch.no_grad():
        model(**inputs)
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2RefinerTransformer3DModel

    torch.manual_seed(0)
    refiner = SanaWMLTX2RefinerTransformer3DModel(**tiny_config(SanaWMLTX2RefinerTransformer3DModel)).eval()
    inputs = adapter_for(refiner).example_inputs(refiner, batch=2, tokens=(4, 6))
    cos, sin = inputs["video_rotary_emb"]
    assert tuple(cos.shape) == tuple(sin.shape) == (2, 4 * 6, 64)
    with torch.no_grad():
        refiner(**inputs)


def test_a_text_encoder_layer_per_transformer_block():
    """Bria-Fibo reads a text encoder's hidden states, one layer per transformer block (its num_layers and
    num_single_layers), each at the width the config names after the input (text_encoder_dim)."""
    model = tiny("BriaFiboTransformer2DModel")
    inputs = adapter_for(model).example_inputs(model, batch=2, tokens=(4, 6))
    layers = inputs["text_encoder_layers"]
    assert len(layers) == model.config.num_layers + model.config.num_single_layers
    assert all(tuple(layer.shape) == (2, 8, model.config.text_encoder_dim) for layer in layers)
    with torch.no_grad():
        model(**inputs)


@pytest.mark.parametrize("class_name, layout, timestep", [
    ("AnyFlowTransformer3DModel", "frames_first", (2, 2)),  # one per latent frame, [B, F]
    ("AnyFlowFARTransformer3DModel", "frames_first", (2, 2)),  # and its frames in one chunk: chunk_partition [F]
    ("SanaWMTransformer3DModel", "video", (2, 1, 2)),  # one per latent frame in a row, [B, 1, F]
])
def test_a_causal_video_model_takes_a_timestep_per_frame(class_name, layout, timestep):
    """Causal video models denoise each latent frame at its own noise level: the timestep's form is probed, and
    calibration's noisy steps give it in that form."""
    model = tiny(class_name)
    adapter = adapter_for(model)
    assert plan_inputs(model).choice.layout == layout
    inputs = adapter.example_inputs(model, batch=2, tokens=(4, 6))
    steps = [name for name, role in plan_inputs(model).parameters.items() if role == "timestep"]
    assert {tuple(inputs[name].shape) for name in steps} == {timestep}
    assert inputs.get("chunk_partition", [2]) == [2]  # where the model takes chunks: one of the 2 latent frames
    calibration = adapter.calib_inputs(model, 1, 2, batch=2, tokens=(4, 6))
    assert all(tuple(sample[name].shape) == timestep for sample in calibration for name in steps)
    with torch.no_grad():
        model(**calibration[-1])


def test_a_class_no_tiny_config_builds_says_where_its_constructor_failed():
    """A constructor that indexes a parameter None by default by position: the error names the line and the
    parameter instead of a bare TypeError."""

    class IndexesItsDefault(torch.nn.Module):
        def __init__(self, in_channels: int = 4, rope_scaling: list | None = None):
            super().__init__()
            self.factor = rope_scaling[0]

    with pytest.raises(InputError, match=r"no tiny config of IndexesItsDefault builds: TypeError: .* at "
                                         r"test_auto_adapter.py:\d+ \(`self.factor = rope_scaling\[0\]`\), "
                                         r"rope_scaling None by default; build it from a released checkpoint's"):
        tiny_config(IndexesItsDefault)


def test_a_dict_none_by_default_that_the_constructor_reads_by_key_is_given_those_keys():
    """OmniGen's constructor reads rope_scaling["short_factor"] and ["long_factor"], None by default: the tiny
    config gives each key the factor 1.0, and the constructor builds."""

    class ReadsFactors(torch.nn.Module):
        def __init__(self, in_channels: int = 4, rope_scaling: dict | None = None):
            super().__init__()
            self.short_factor = rope_scaling["short_factor"]
            self.long_factor = rope_scaling["long_factor"]

    assert tiny_config(ReadsFactors)["rope_scaling"] == {"short_factor": 1.0, "long_factor": 1.0}


def test_a_latent_of_whole_patches_with_its_grid_per_sample():
    """JoyImage takes its latent as whole patches [B, F·rows·cols, C, pt, ph, pw] (its patch_size [1, 2, 2]) and,
    per sample, a list of the grids its patches come from; the adapter reads the grid back from that list."""
    model = tiny("JoyImageEditPlusTransformer3DModel")
    adapter = adapter_for(model)
    assert plan_inputs(model).choice.layout == "patches"
    inputs = adapter.example_inputs(model, batch=2, tokens=(4, 6))
    assert tuple(inputs["hidden_states"].shape) == (2, 2 * 4 * 6, model.config.in_channels, 1, 2, 2)
    assert inputs["shape_list"] == [[(2, 4, 6)]] * 2
    assert adapter.tokens_of(model, inputs) == (4, 6)
    with torch.no_grad():
        assert model(**inputs)[0].shape == inputs["hidden_states"].shape


def test_a_decoder_of_continuous_tokens_conditioned_on_encodings_with_their_masks():
    """T5-FiLM denoises continuous frames (decoder_input_tokens, input_dims wide) and cross-attends to a list of
    (encoding, mask) pairs at its model width (d_model); its noise time is a timestep by its name."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.T5FilmDecoder(**tiny_config(diffusers.T5FilmDecoder)).eval()
    assert plan_inputs(model).parameters == {"encodings_and_masks": "text_pairs", "decoder_input_tokens": "latent",
                                             "decoder_noise_time": "timestep"}
    inputs = adapter_for(model).example_inputs(model, batch=2, tokens=(4, 6))
    assert tuple(inputs["decoder_input_tokens"].shape) == (2, 24, model.config.input_dims)
    [(encoding, mask)] = inputs["encodings_and_masks"]
    assert tuple(encoding.shape) == (2, 8, model.config.d_model) and tuple(mask.shape) == (2, 8)
    with torch.no_grad():
        assert model(**inputs).shape == inputs["decoder_input_tokens"].shape


def test_a_second_modality_denoised_beside_the_latent():
    """LTX-2 denoises audio beside video: audio_hidden_states are packed tokens, one per latent frame, at the
    config's audio_in_channels; audio_encoder_hidden_states its text; audio_num_frames its length as an int."""
    model = tiny("LTX2VideoTransformer3DModel")
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model, batch=2, tokens=(4, 6))
    assert tuple(inputs["audio_hidden_states"].shape) == (2, 2, model.config.audio_in_channels)
    assert tuple(inputs["audio_encoder_hidden_states"].shape) == tuple(inputs["encoder_hidden_states"].shape)
    assert inputs["audio_num_frames"] == 2 and "audio_num_frames" in adapter.sizes_in_values(model, inputs)
    with torch.no_grad():
        video, audio = model(**inputs)[:2]
    assert video.shape == inputs["hidden_states"].shape and audio.shape == inputs["audio_hidden_states"].shape


def test_embeddings_a_transformer_decodes_at_its_width_within_its_position_table():
    """MiniMax-Music 3's depth decoder takes inputs_embeds (no latent channel key: at its hidden_size) and has a
    table of max_position_embeddings positions: the example grid holds no more tokens than that."""
    from diffusers.models.transformers.minimax_music3_rvq_depth_decoder import MiniMaxMusic3RVQDepthDecoder

    torch.manual_seed(0)
    model = MiniMaxMusic3RVQDepthDecoder(**tiny_config(MiniMaxMusic3RVQDepthDecoder)).eval()
    inputs = adapter_for(model).example_inputs(model, batch=2)
    batch, tokens, width = inputs["inputs_embeds"].shape
    assert width == model.config.hidden_size and 2 < tokens <= model.config.max_position_embeddings
    with torch.no_grad():
        model(**inputs)


def test_codebook_ids_as_the_latent():
    """aMUSEd's UVit denoises masked VQ tokens: input_ids [B, H, W] are ids below the config's codebook_size, and
    calibration's noisy steps give ids too (a flow-stepped Gaussian field read through its CDF)."""
    model = tiny("UVit2DModel")
    adapter = adapter_for(model)
    assert plan_inputs(model).choice.layout == "ids"
    inputs = adapter.example_inputs(model, batch=2, tokens=(4, 6))
    ids = inputs["input_ids"]
    assert ids.dtype == torch.long and tuple(ids.shape) == (2, 4, 6)
    assert 0 <= int(ids.min()) and int(ids.max()) < model.config.codebook_size
    assert adapter.tokens_of(model, inputs) == (4, 6)
    steps = adapter.calib_inputs(model, 1, 2, batch=2, tokens=(4, 6))
    assert all(step["input_ids"].dtype == torch.long for step in steps)
    assert not torch.equal(steps[0]["input_ids"], steps[1]["input_ids"])
    with torch.no_grad():
        assert model(**steps[-1]).shape == (2, model.config.codebook_size, 4, 6)


def test_a_partial_coverage_run_never_replaces_the_whole_result(tmp_path, capsys):
    from bench_coverage import main

    result = tmp_path / "coverage.json"
    result.write_text('{"classes": []}')
    assert main(["--only", "FluxTransformer2DModel", "--out", str(result)]) == 2
    assert "add --update" in capsys.readouterr().err and result.read_text() == '{"classes": []}'


def test_a_model_that_is_not_a_diffusers_one_compiles_without_importing_diffusers():
    """The auto adapter asks whether a model is a diffusers ModelMixin without importing diffusers (no model is
    one before diffusers' modeling module is loaded): the import cost a MiniLM compile about a second."""
    import subprocess

    code = ("import sys, torch, svdq_compiler\n"
            "model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))\n"
            "svdq_compiler.compile(model, (torch.randn(16, 64),), 'int4', calib_inputs=[(torch.randn(16, 64),)])\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] == 'diffusers'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
