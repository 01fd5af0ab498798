"""Data-free calibration: which GELU the isotropic rows of a post-GELU input go through.

`calib_source="weights"` (and the streaming compile) calibrate on standard normal rows; an input the layer
shifts (post-GELU, unsigned INT4) gets a GELU of them. The calibrate pass used the erf GELU and the streaming
compile the tanh one; both now follow the graph's own GELU node (`calibration.isotropic_calibration`). This
compiles each model with the int4 preset and `calib_source="weights"` twice, with the rows through the erf GELU
(the calibrate pass before) and through the graph's own, and reports the relative L2 error and cosine similarity
of the output against the fp32 model on held-out inputs (adapter inputs on seeds apart from calibration's).
Writes bench/results/isotropic-gelu.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from unittest import mock

import torch
from bench_common import machine, write_result
from eval_quality import first_output

import svdq_compiler
from svdq_compiler import calibration
from svdq_compiler.models import adapter_for, load_model

CHOICES = {"erf (before)": lambda x: "none", "graph's own (after)": calibration._gelu_approximation}


def measure(name: str, inputs: int) -> dict:
    model = load_model(name)
    adapter = adapter_for(model)
    held_out = [adapter.calib_inputs(model, 1, 1, seed=1000 + i)[0] for i in range(inputs)]
    with torch.no_grad():
        references = [first_output(model(**x) if isinstance(x, dict) else model(*x)).float() for x in held_out]
    config = svdq_compiler.QuantConfig.preset("int4", calib_source="weights")
    rows = {}
    for label, choice in CHOICES.items():
        with mock.patch.object(calibration, "_gelu_approximation", choice):
            gm = svdq_compiler.compile(model, adapter.example_inputs(model), config)
        errors, cosines = [], []
        with torch.no_grad():
            for x, reference in zip(held_out, references):
                out = first_output(gm(**x) if isinstance(x, dict) else gm(*x)).float()
                errors.append(float((out - reference).norm() / reference.norm()))
                cosines.append(float(torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), 0)))
        rows[label] = {"rel_l2_mean": sum(errors) / len(errors), "cosine_mean": sum(cosines) / len(cosines)}
        print(f"{name} {label}: {rows[label]}", flush=True)
    gelus = {node.kwargs.get("approximate", "none") for node in svdq_compiler.capture(
        model, adapter.example_inputs(model)).graph.nodes if node.target == torch.ops.aten.gelu.default}
    return {"graph_gelus": sorted(gelus), "results": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="random:flux,random:pixart,tiny-flux")
    parser.add_argument("--inputs", type=int, default=8, help="held-out inputs per model")
    parser.add_argument("--out", type=Path, default=Path("bench/results/isotropic-gelu.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report = {"machine": machine(), "preset": "int4", "calib_source": "weights",
              "models": {name: measure(name, args.inputs) for name in args.models.split(",")}}
    write_result(report, args.out)


if __name__ == "__main__":
    main()
