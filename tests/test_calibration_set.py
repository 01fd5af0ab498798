"""Calibration sets (svdq_compiler/calibration_set.py): collected through each family's own diffusers pipeline
(tiny random-weight pipelines built in tests/tiny_pipelines.py), saved and reused, checked against the model,
and the compiled denoiser put back into its pipeline to generate at two resolutions.

FLUX runs in the default suite; the other four families are slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import svdq_compiler
from svdq_compiler.calibration import load_calibration
from svdq_compiler.calibration_set import (CalibrationSet, collect, kept_steps, load_calibration_set,
                                           pipeline_problem, read_prompts)
from svdq_compiler.cli import calibration_prompts, compile_main, compile_parser
from tiny_pipelines import PIPELINES, write_pipeline

# Search settings that keep a compile of a tiny model to seconds; they do not change what calibration sees.
FAST = ["--set", "smooth_grid=2", "--set", "iterations=1", "--set", "calib_rows=64"]
# Pixel sizes per family: calibration, then the two generations (small, neither the pipelines' defaults nor each
# other; Sana's pipeline takes multiples of 32, the random SD3's position embedding at most 15 patches a side).
SIZES = {family: ((32, 48), (32, 32), (48, 32)) for family in PIPELINES} | {"sana": ((32, 64), (32, 32), (64, 32))}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("svdq-compile: error:"), err
    return err


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return write_pipeline("flux", tmp_path_factory.mktemp("pipelines") / "flux")


# Enough of the pipeline to see what calibration got: the statistics it saves (--save-calib).
CALIBRATE_ONLY = ["--passes", "annotate_linears,calibrate"]


def compile_pipeline(folder: Path, out: Path, *flags: str) -> dict:
    report = out.with_suffix(".json")
    assert compile_main([str(folder), "--out", str(out), "--report", str(report), "--calib-steps", "2",
                         "--calib-sampler-steps", "3", "--calib-size", "x".join(map(str, SIZES[folder.name][0])), *FAST,
                         *flags]) == 0
    return json.loads(report.read_text())


def generate(family: str, folder: Path, denoiser: torch.nn.Module | None, size: tuple[int, int]) -> torch.Tensor:
    """An image of the pipeline in `folder`, with `denoiser` in place of its own (None: its own)."""
    from svdq_compiler.calibration_set import denoiser_attribute, load_pipeline

    pipe = load_pipeline(folder)
    if denoiser is not None:
        setattr(pipe, denoiser_attribute(pipe), denoiser)
    options = {"use_resolution_binning": False} if family in ("pixart", "sana") else {}  # no bins at tiny sizes
    with torch.no_grad():
        return pipe(prompt="a red fox sitting in fresh snow", num_inference_steps=3, height=size[0], width=size[1],
                    generator=torch.Generator().manual_seed(5), output_type="pt", **options).images


def check_family(family: str, folder: Path, tmp_path: Path) -> None:
    """collect → compile → the loaded graph as the pipeline's denoiser generates at two resolutions, close to
    the 32-bit pipeline's images."""
    graph = tmp_path / "g.pt"
    report = compile_pipeline(folder, graph, "--calib-prompts", "2")
    assert report["calibration"]["source"] == "pipeline prompts"
    calibrate = next(record for record in report["passes"] if record["name"] == "calibrate")
    assert calibrate["stats"]["inputs"] == 4 and calibrate["stats"]["source"].startswith("calibration set")
    saved = load_calibration_set(report["calibration"]["written"])
    assert saved.provenance.pipeline_class == type(PIPELINES[family]()).__name__
    assert len(saved) == 4 and (saved.provenance.height, saved.provenance.width) == SIZES[family][0]
    compiled = svdq_compiler.load(graph)
    for size in SIZES[family][1:]:
        image, reference = generate(family, folder, compiled, size), generate(family, folder, None, size)
        assert image.shape == reference.shape == (1, 3, *size)
        assert torch.isfinite(image).all()
        error = float((image - reference).norm() / reference.norm())
        # Quantized (so not bit-identical: the graph ran), and close (0.002–0.06 measured across the families).
        assert 0 < error < 0.1, f"{family} at {size}: relative image error {error}"


# ---- the FLUX family end to end (default suite) ---------------------------------------------------------------

def test_a_flux_pipeline_folder_calibrates_on_real_prompts_and_its_graph_generates(flux_folder, tmp_path, capsys):
    check_family("flux", flux_folder, tmp_path)
    summary = capsys.readouterr().out
    assert "calibration: calibration set" in summary and "FluxPipeline on 2 prompts × 2 of 3 sampler steps at 32×48" \
        in summary and "calibration set " + str(tmp_path / "g.calibset.safetensors") in summary


def test_a_saved_set_gives_the_same_statistics_as_collecting(flux_folder, tmp_path):
    collected = compile_pipeline(flux_folder, tmp_path / "a.pt", *CALIBRATE_ONLY, "--calib-prompts", "2", "--save-calib",
                                 str(tmp_path / "a.stats"))
    shipped = read_prompts()  # the default: prompts spread over the shipped captions
    assert len(shipped) >= 128 and len(set(shipped)) == len(shipped)
    assert collected["calibration"]["provenance"]["prompts"] == [shipped[0], shipped[len(shipped) // 2]]
    reused = compile_pipeline(flux_folder, tmp_path / "b.pt", *CALIBRATE_ONLY, "--save-calib", str(tmp_path / "b.stats"),
                              "--calib-set", str(tmp_path / "a.calibset.safetensors"))
    assert reused["calibration"]["source"] == "calibration set"
    assert reused["calibration"]["provenance"] == collected["calibration"]["provenance"]
    assert "calibration set" not in reused["written"]  # nothing collected, nothing written
    first, second = load_calibration(tmp_path / "a.stats"), load_calibration(tmp_path / "b.stats")
    assert first.sites.keys() == second.sites.keys() and first.inputs == second.inputs == 4
    for name, stats in first.sites.items():
        for field in ("minimum", "maximum", "rows", "priorities"):
            assert torch.equal(getattr(stats, field), getattr(second.sites[name], field)), (name, field)


def test_a_prompts_file_gives_every_prompt(flux_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# mine\na red car on a street\n\na blue house\na cat\n")
    report = compile_pipeline(flux_folder, tmp_path / "g.pt", *CALIBRATE_ONLY, "--calib-prompts-file", str(prompts))
    assert report["calibration"]["provenance"]["prompts"] == ["a red car on a street", "a blue house", "a cat"]
    args = compile_parser().parse_args(["--out", "g.pt", "--calib-prompts-file", str(prompts), "--calib-prompts", "2"])
    assert calibration_prompts(args) == ["a red car on a street", "a blue house"]


def test_a_model_folder_keeps_random_conditioning_and_says_why(flux_folder, tmp_path, capsys):
    assert compile_main([str(flux_folder / "transformer"), "--out", str(tmp_path / "g.pt"), "--calib-prompts", "1",
                         "--calib-steps", "1", "--passes", "annotate_linears,calibrate",
                         "--report", str(tmp_path / "r.json")]) == 0
    summary = capsys.readouterr().out
    assert "calibration: random conditioning" in summary and "not a pipeline folder" in summary
    calibration = json.loads((tmp_path / "r.json").read_text())["calibration"]
    assert calibration["source"] == "random conditioning" and "no model_index.json" in calibration["detail"]
    assert "calibration set" not in json.loads((tmp_path / "r.json").read_text())["written"]
    assert not list(tmp_path.glob("*.calibset.safetensors"))


# ---- the set itself --------------------------------------------------------------------------------------------

def test_collect_records_the_kept_steps_and_stores_shared_tensors_once(flux_folder, tmp_path):
    from safetensors import safe_open

    from svdq_compiler.calibration_set import load_pipeline

    pipe = load_pipeline(flux_folder)
    collected = collect(pipe, ["a cat", "a dog"], 3, sampler_steps=6, height=16, width=32, seed=3)
    assert collected.provenance.kept_steps == tuple(kept_steps(6, 3, torch.Generator().manual_seed(3 + i))
                                                    for i in range(2))
    assert len(collected) == 6
    assert collected[0]["hidden_states"].shape[1] == (16 // 2 // 2) * (32 // 2 // 2)  # VAE 2×, FLUX 2×2 packing
    # The timesteps of one prompt fall, noisiest first, as its kept steps do.
    timesteps = [float(sample["timestep"]) for sample in collected[:3]]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 3
    # A prompt's text embeddings are the same tensor at each of its steps, and stored once.
    assert collected[0]["encoder_hidden_states"] is collected[2]["encoder_hidden_states"]
    assert collected[0]["encoder_hidden_states"] is not collected[3]["encoder_hidden_states"]
    path = collected.save(tmp_path / "set.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        stored = len(list(handle.keys()))
    per_sample = sum(isinstance(value, torch.Tensor) for value in collected[0].values())
    assert stored < per_sample * len(collected)
    loaded = load_calibration_set(path)
    assert loaded.provenance == collected.provenance and len(loaded) == len(collected)
    for before, after in zip(collected, loaded):
        assert before.keys() == after.keys()
        for key, value in before.items():
            assert torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key]


def test_kept_steps_take_one_seeded_step_per_stretch_of_the_schedule():
    picks = [kept_steps(28, 4, torch.Generator().manual_seed(seed)) for seed in range(20)]
    for pick in picks:
        assert [step // 7 for step in pick] == [0, 1, 2, 3]
    assert len(set(picks)) > 1  # seeds pick different steps
    assert kept_steps(28, 4, torch.Generator().manual_seed(0)) == picks[0]
    assert kept_steps(3, 5, torch.Generator().manual_seed(0)) == (0, 1, 2)


def test_a_calibration_set_is_a_sequence_of_keyword_inputs(flux_folder):
    from svdq_compiler.calibration_set import load_pipeline

    collected = collect(load_pipeline(flux_folder), ["a cat"], 1, sampler_steps=2, height=16, width=16)
    assert isinstance(collected, CalibrationSet) and len(list(collected)) == 1 and isinstance(collected[0], dict)
    assert collected.source.startswith("calibration set: FluxPipeline on 1 prompts × 1 of 2 sampler steps")


# ---- bad input: one line, exit 2 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_set(flux_folder, tmp_path_factory):
    from svdq_compiler.calibration_set import load_pipeline

    path = tmp_path_factory.mktemp("sets") / "flux.safetensors"
    return collect(load_pipeline(flux_folder), ["a cat"], 1, sampler_steps=2, height=16, width=16).save(path)


@pytest.mark.parametrize("model, message", [
    ("random:pixart", "was recorded for a FluxTransformer2DModel, not this PixArtTransformer2DModel"),
    ("other-flux", "was recorded for a FluxTransformer2DModel with another config"),
])
def test_a_set_recorded_for_another_model_gives_one_line(flux_set, tmp_path, capsys, model, message):
    if model == "other-flux":
        from svdq_compiler.models.flux import FluxAdapter
        from svdq_compiler.models.loading import write_single_file

        adapter = FluxAdapter()
        other = adapter.model_class()(**{**adapter.random_config(), "joint_attention_dim": 64})
        model = str(write_single_file(other, tmp_path / "other.safetensors"))
    assert compile_main([model, "--out", str(tmp_path / "g.pt"), "--calib-set", str(flux_set)]) == 2
    assert message in one_line_error(capsys)
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize("case, message", [
    ("empty", "the prompts file holds no prompts"),
    ("missing", "no such prompts file"),
    ("no-pipeline", "--calib-prompts-file runs the model's own pipeline, but it is not a diffusers pipeline folder"),
    ("missing-set", "no such calibration set file"),
    ("foreign-set", "not a calibration set"),
    ("both", "--calib-set and --calib-prompts-file both give the calibration inputs"),
    ("too-many", "--calib-prompts 9 asks for more prompts than the 1 of"),
])
def test_bad_calibration_input_gives_one_line(flux_folder, tmp_path, capsys, case, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n\n" if case == "empty" else "a cat\n")
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(foreign))
    model = "random:flux" if case == "no-pipeline" else str(flux_folder)
    flags = {"empty": ["--calib-prompts-file", str(prompts)],
             "missing": ["--calib-prompts-file", str(tmp_path / "nope.txt")],
             "no-pipeline": ["--calib-prompts-file", str(prompts)],
             "missing-set": ["--calib-set", str(tmp_path / "nope.safetensors")],
             "foreign-set": ["--calib-set", str(foreign)],
             "both": ["--calib-set", str(foreign), "--calib-prompts-file", str(prompts)],
             "too-many": ["--calib-prompts-file", str(prompts), "--calib-prompts", "9"]}[case]
    assert compile_main([model, "--out", str(tmp_path / "g.pt"), *flags]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "g.pt").exists() and not list(tmp_path.glob("*.calibset.safetensors"))


def test_an_incomplete_pipeline_folder_says_what_it_lacks(flux_folder, tmp_path):
    (tmp_path / "transformer").symlink_to(flux_folder / "transformer")
    (tmp_path / "model_index.json").write_text((flux_folder / "model_index.json").read_text())
    assert pipeline_problem(tmp_path) == "the pipeline folder lacks scheduler, vae, text_encoder, tokenizer, " \
                                         "text_encoder_2, tokenizer_2"
    assert pipeline_problem(flux_folder) is None


# ---- a saved set calibrates a streamed compile ------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_set_two_prompts(flux_folder, tmp_path_factory):
    from svdq_compiler.calibration_set import load_pipeline

    path = tmp_path_factory.mktemp("sets") / "flux2.safetensors"
    return collect(load_pipeline(flux_folder), ["a cat", "a red car on a street"], 2, sampler_steps=3, height=32,
                   width=48).save(path)


def test_a_streamed_compile_calibrates_block_by_block_on_a_saved_set(flux_folder, flux_set_two_prompts, tmp_path,
                                                                    capsys):
    """--stream on --calib-set: the set's inputs, not random conditioning, run through the model block by block,
    and the graph holds the very tensors (λ, branches, packed weights) of the same passes run in memory on the
    whole model calibrated on that set at once (the streamed compile's passes: compress in place of lowrank +
    quantize_weights, passes/compress.py)."""
    from diffusers import FluxTransformer2DModel

    from svdq_compiler.config import QuantConfig
    from svdq_compiler.models import adapter_for
    from svdq_compiler.pipeline import PASS_REGISTRY, PassContext, run_passes

    folder = flux_folder / "transformer"
    assert compile_main([str(folder), "--out", str(tmp_path / "streamed.pt"), "--stream", "on", "--calib-set",
                         str(flux_set_two_prompts), "--report", str(tmp_path / "streamed.json"), *FAST]) == 0
    summary = capsys.readouterr().out
    report = json.loads((tmp_path / "streamed.json").read_text())
    calibration = report["calibration"]
    assert calibration["source"] == "calibration set" and calibration["samples"] == 4
    assert calibration["provenance"]["prompts"] == ["a cat", "a red car on a street"]
    assert report["streaming"]["calibration"] == "activations"  # implied by the set
    assert report["streaming"]["block_calibration"]["inputs"] == 4
    assert f"calibration: calibration set ({flux_set_two_prompts}): FluxPipeline on 2 prompts × 2 of 3 sampler " \
           f"steps at 32×48, guidance 3.5, seed 0, block by block (fp propagation)" in summary

    model = FluxTransformer2DModel.from_pretrained(folder).eval()
    adapter = adapter_for(model)
    example = adapter.example_inputs(model, batch=2)
    calib = load_calibration_set(flux_set_two_prompts).conformed(model, example)
    config = QuantConfig.preset("int4").replace(svd="randomized", smooth_grid=2, iterations=1, calib_rows=64)
    ctx = PassContext(config=config, example_inputs=example, calib_inputs=calib, adapter=adapter, model=model)
    in_memory = run_passes(svdq_compiler.capture(model, example), ctx, [PASS_REGISTRY[name] for name in (
        "annotate_linears", "calibrate", "smooth", "compress", "lower", "fuse")]).state_dict()
    streamed = {name.removeprefix("graph_module."): t
                for name, t in svdq_compiler.load(tmp_path / "streamed.pt").state_dict().items()}
    assert sorted(streamed) == sorted(in_memory)
    assert [name for name in in_memory if not torch.equal(in_memory[name], streamed[name])] == []
    smoothed = [t for name, t in in_memory.items() if name.endswith(".smooth")]
    assert smoothed and any(not torch.all(t == 1) for t in smoothed)  # activation-aware λ, not the data-free 1


def edited_set(path: Path, out: Path, edit) -> Path:
    """The set at `path` with `edit(sample)` applied to every sample, saved to `out`."""
    loaded = load_calibration_set(path)
    for sample in loaded.samples:
        edit(sample)
    return loaded.save(out)


@pytest.mark.parametrize("case, message", [
    ("lacks-key", "the set lacks the inputs ['timestep'] the captured model takes"),
    ("extra-key", "the recorded denoiser inputs ['mystery'] are not inputs of the captured model"),
    ("wrong-dims", "input 'hidden_states' was recorded with shape"),
    ("other-config", "was recorded for a FluxTransformer2DModel with another config"),
])
@pytest.mark.parametrize("stream", ["on", "off"])
def test_a_mismatched_set_gives_the_same_line_streamed_or_not(flux_folder, flux_set, tmp_path, capsys, case, message,
                                                             stream):
    model = str(flux_folder / "transformer")
    if case == "other-config":
        from diffusers import FluxTransformer2DModel

        config = {k: v for k, v in FluxTransformer2DModel.load_config(model).items() if not k.startswith("_")}
        FluxTransformer2DModel(**{**config, "joint_attention_dim": 2 * config["joint_attention_dim"]}).save_pretrained(
            tmp_path / "other")
        model, calib_set = str(tmp_path / "other"), flux_set
    else:
        edit = {"lacks-key": lambda sample: sample.pop("timestep"),
                "extra-key": lambda sample: sample.update(mystery=torch.ones(1)),
                "wrong-dims": lambda sample: sample.update(hidden_states=sample["hidden_states"][0])}[case]
        calib_set = edited_set(flux_set, tmp_path / "edited.safetensors", edit)
    assert compile_main([model, "--out", str(tmp_path / "g.pt"), "--stream", stream, "--calib-set",
                         str(calib_set)]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "g.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--calib-set", "SET", "--stream-smoothing", "none"],
     "--calib-set gives calibration inputs, but --stream-smoothing none streams data-free"),
    (["--calib-prompts-file", "PROMPTS"], "--calib-prompts-file runs the model's own pipeline, and a streamed model "
                                          "is never whole in memory to run it"),
])
def test_streaming_refuses_calibration_it_cannot_use(flux_folder, flux_set, tmp_path, capsys, flags, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    given = [{"SET": str(flux_set), "PROMPTS": str(prompts)}.get(flag, flag) for flag in flags]
    assert compile_main([str(flux_folder / "transformer"), "--out", str(tmp_path / "g.pt"), "--stream", "on",
                         *given]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "g.pt").exists()


# ---- the other families (slow) -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "pixart", "sana", "unet"])
def test_each_pipeline_family_collects_compiles_and_generates(family, tmp_path):
    check_family(family, write_pipeline(family, tmp_path / family), tmp_path)
