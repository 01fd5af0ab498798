"""One kernel signature, derived from the spec: generate writes the `def` line from it, launch binds by name."""

import ast
import dataclasses

import pytest
import torch

from svdq_compiler.codegen import launch
from svdq_compiler.codegen.generate import Target, generate
from svdq_compiler.codegen.signature import Param, SignatureError, signature_of
from svdq_compiler.codegen.spec import ActQuant, Epilogue, GemmSpec, QuantizeNext, QuantizeSpec, WeightOnlySpec

SPECS = [
    QuantizeSpec(ActQuant("int4", 64), 32, "bfloat16"),
    QuantizeSpec(ActQuant("int8", 0, smooth=False), 0, "float16", k=256),
    GemmSpec("int4", 64, 32, True, "bfloat16", k=3072, n=3072),
    GemmSpec("nvfp4", 16, 0, False, "float16", epilogue=(Epilogue("mul"), Epilogue("add_scalar", 1.0))),
    GemmSpec("int8", 0, 16, True, "bfloat16", epilogue=(Epilogue("gelu_tanh"), Epilogue("add"))),
    GemmSpec("int4", 64, 32, True, "bfloat16", quantize_next=QuantizeNext(ActQuant("uint4", 64, 0.171875), 32,
                                                                           emit_output=False)),
    WeightOnlySpec("nf4", 64, 16, True, "bfloat16", epilogue=(Epilogue("silu"), Epilogue("mul"))),
    WeightOnlySpec("int4", 128, 0, False, "float16", k=512, n=96),
]


def _def_params(source: str, name: str) -> list[str]:
    (kernel,) = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == name]
    return [arg.arg for arg in kernel.args.args]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_generated_def_line_and_docstring_follow_the_signature(spec):
    signature = signature_of(spec)
    source = generate(spec, Target("cuda", (9, 0)))
    assert _def_params(source, spec.name) == list(signature.names)
    constexprs = {a.arg for a in next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)
                                      and n.name == spec.name).args.args if a.annotation is not None}
    assert constexprs == set(signature.constexprs)
    docstring = ast.get_docstring(ast.parse(source))
    assert "Signature (codegen.signature" in docstring
    assert all(param.text() in " ".join(docstring.split()) for param in signature.params)


def test_bind_orders_by_name_and_names_what_is_missing_or_unknown():
    signature = signature_of(GemmSpec("int4", 64, 0, True, "bfloat16", k=64, n=32))
    values = {name: index for index, name in enumerate(reversed(signature.names))}
    assert signature.bind(values) == [values[name] for name in signature.names]
    with pytest.raises(SignatureError, match="missing bias_ptr"):
        signature.bind({k: v for k, v in values.items() if k != "bias_ptr"})
    with pytest.raises(SignatureError, match="unknown extra_ptr"):
        signature.bind({**values, "extra_ptr": 0})


class _RecordingKernel:
    """Stands in for a compiled kernel: keeps the positional arguments of its launch."""

    def __init__(self):
        self.args = None

    def __getitem__(self, grid):
        def run(*args, **options):
            self.args = args
        return run


def _gemm_case():
    spec = GemmSpec("int4", 64, 4, True, "bfloat16", k=64, n=32, epilogue=(Epilogue("mul"),))
    m, n = 2, 32
    tensors = dict(a_codes=torch.zeros(m, 32, dtype=torch.uint8), a_scales=torch.ones(m, 1, dtype=torch.bfloat16),
                   w_codes=torch.zeros(n, 32, dtype=torch.uint8), w_scales=torch.ones(1, n, dtype=torch.bfloat16),
                   w_tscale=None, down=torch.zeros(m, 4, dtype=torch.bfloat16),
                   lora_up=torch.zeros(n, 4, dtype=torch.bfloat16), bias=torch.arange(n, dtype=torch.bfloat16),
                   operands=[torch.ones(m, n, dtype=torch.bfloat16)], next_smooth=None, next_lora_down=None)
    return spec, tensors


def test_launch_binds_each_tensor_to_its_parameter(monkeypatch):
    spec, tensors = _gemm_case()
    kernel = _RecordingKernel()
    monkeypatch.setattr(launch, "load_kernel", lambda spec, target: kernel)
    launch.gemm(**tensors, spec=spec)
    names = signature_of(spec).names
    assert kernel.args[names.index("bias_ptr")] is tensors["bias"]
    assert kernel.args[names.index("lora_up_ptr")] is tensors["lora_up"]
    assert kernel.args[names.index("M")] == 2


@pytest.mark.parametrize("change, message", [
    (lambda params: params[:4] + (Param("extra_ptr", "pointer", "float32"),) + params[4:], "missing extra_ptr"),
    (lambda params: tuple(p for p in params if p.name != "bias_ptr"), "unknown bias_ptr"),
])
def test_a_signature_that_launch_does_not_know_fails_loudly(monkeypatch, change, message):
    spec, tensors = _gemm_case()
    monkeypatch.setattr(launch, "load_kernel", lambda spec, target: _RecordingKernel())
    real = signature_of(spec)
    changed = dataclasses.replace(real, params=change(real.params))
    monkeypatch.setattr(launch, "signature_of", lambda spec: changed)
    with pytest.raises(SignatureError, match=message):
        launch.gemm(**tensors, spec=spec)
