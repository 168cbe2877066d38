"""The server's request checks without a server: parsing (HTTP JSON, gRPC), its own fields' refusals, and that
every model-argument refusal carries exactly the message Pipeline.generate gives for the same arguments."""
import json

import pytest

from serve_server import have_serve

from ideogram4_engine.runtime.pipeline import Pipeline
from ideogram4_engine.serve.request import InvalidRequest, Limits, Validator, from_json

LIMITS = Limits(default_width=256, default_height=256, max_n=4, timeout_s=60.0)


@pytest.fixture(scope="module")
def validator(tiny_engines):
    return Validator(tiny_engines)


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    return Pipeline(tiny_engines, backend="onnxruntime-cpu")


def parse(**fields):
    return from_json(json.dumps(fields).encode(), LIMITS)


LONG_PROMPT = "lighthouse " * 2100

# (HTTP JSON fields, the same request as Pipeline.generate keyword arguments)
MODEL_REFUSALS = [
    ({"size": "100x256"}, {"width": 100, "height": 256}),
    ({"size": "4096x256"}, {"width": 4096, "height": 256}),
    ({"size": "2048x256"}, {"width": 2048, "height": 256}),
    ({"preset": "V5_FAST"}, {"preset": "V5_FAST"}),
    ({"steps": 3}, {"steps": 3}),
    ({"steps": 0, "guidance": 4}, {"steps": 0, "guidance": 4.0}),
    ({"steps": 2, "guidance": [1, 2, 3]}, {"steps": 2, "guidance": (1.0, 2.0, 3.0)}),
    ({"prompt": ""}, {"prompts": ""}),
    ({"prompt": "   "}, {"prompts": "   "}),
    ({"prompt": LONG_PROMPT}, {"prompts": LONG_PROMPT}),
    ({"seed": 2**64}, {"seed": 2**64}),
    ({"seed": -1}, {"seed": -1}),
]


@pytest.mark.parametrize("fields,kwargs", MODEL_REFUSALS, ids=[json.dumps(f)[:40] for f, _ in MODEL_REFUSALS])
def test_model_refusals_are_the_runtimes_messages(validator, pipe, fields, kwargs):
    request = parse(**{"prompt": "a red fox", "size": "256x256", **fields})
    with pytest.raises(InvalidRequest) as served:
        validator.check(request)
    call = {"width": 256, "height": 256, "seed": 0, **kwargs}
    with pytest.raises(ValueError) as direct:
        pipe.generate(call.pop("prompts", "a red fox"), **call)
    assert str(served.value) == str(direct.value)
    assert "\n" not in str(served.value)


SERVER_REFUSALS = [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'{"prompt": "a", "guidance": NaN}', "finite numbers only"),
    (b'{"size": "256x256"}', "prompt is missing"),
    (b'{"prompt": "a", "output": "/etc/passwd"}', "unknown field 'output'; allowed: prompt, n, size"),
    (b'{"prompt": "a", "model": "dall-e-3"}', "model=\"dall-e-3\" is not served here; allowed: ideogram-4-fp8"),
    (b'{"prompt": "a", "response_format": "url"}', "response_format=\"url\" is not supported"),
    (b'{"prompt": "a", "n": 0}', "n=0 outside 1…4"),
    (b'{"prompt": "a", "n": 5}', "n=5 outside 1…4"),
    (b'{"prompt": "a", "n": true}', "n=true must be an integer"),
    (b'{"prompt": "a", "size": "big"}', "size=\"big\" must be WIDTHxHEIGHT"),
    (b'{"prompt": "a", "size": 256}', "size=256 must be a string"),
    (b'{"prompt": "a", "steps": 2.5, "guidance": 3}', "steps=2.5 must be an integer"),
    (b'{"prompt": "a", "guidance": "high"}', "guidance=\"high\" must be a finite number"),
    (b'{"prompt": "a", "steps": 2, "guidance": [1, "x"]}', "guidance[1]=\"x\" must be a finite number"),
    (b'{"prompt": "a", "output_format": "gif"}', "output_format=\"gif\" is not supported; allowed: png, jpeg, webp"),
    (b'{"prompt": "a", "timeout_s": 0}', "timeout_s=0 outside (0, 60] seconds"),
    (b'{"prompt": "a", "timeout_s": 61}', "timeout_s=61 outside (0, 60] seconds"),
    (b'{"prompt": "a", "mu": 1e999}', "mu=Infinity must be a finite number"),
    (b'{"prompt": 7}', None),                      # the tokenizer's own refusal, checked by the validator
]


@pytest.mark.parametrize("body,message", SERVER_REFUSALS, ids=[b.decode()[:40] for b, _ in SERVER_REFUSALS])
def test_server_field_refusals(validator, body, message):
    with pytest.raises(InvalidRequest) as e:
        validator.check(from_json(body, LIMITS))
    text = str(e.value)
    assert "\n" not in text
    if message is None:             # the runtime's own refusal, word for word
        from ideogram4_engine.runtime.request import check_prompts
        with pytest.raises(ValueError) as own:
            check_prompts(json.loads(body)["prompt"])
        assert text == str(own.value)
    else:
        assert message in text, text


def test_defaults_and_openai_fields(validator):
    r = from_json(b'{"prompt": "{\\"scene\\": \\"a fox\\"}", "response_format": "b64_json", "model": '
                  b'"ideogram-4-fp8", "user": "u1"}', LIMITS)
    assert (r.prompt, r.n, r.width, r.height, r.output_format, r.timeout_s) == \
        ('{"scene": "a fox"}', 1, 256, 256, "png", 60.0)      # a JSON caption passes through unchanged
    assert 0 <= r.seed < 2**64 and r.seed != from_json(b'{"prompt": "a"}', LIMITS).seed   # random when absent
    checked = validator.check(r)
    assert checked.sampling.preset == "V4_DEFAULT_20" and checked.sampling.steps == 20
    r = parse(prompt="a", size="512x256", n=2, seed=7, steps=2, guidance=[3, 5], mu=0.5, std=1.2,
              output_format="webp", timeout_s=5)
    assert (r.width, r.height, r.n, r.seed, r.steps, r.guidance, r.mu, r.std, r.output_format, r.timeout_s) == \
        (512, 256, 2, 7, 2, (3.0, 5.0), 0.5, 1.2, "webp", 5.0)
    assert parse(prompt="a", steps=1, guidance=[4]).guidance == 4.0
    assert validator.check(r).sampling.guidance == (3.0, 5.0)


@pytest.mark.skipif(not have_serve()[0], reason=have_serve()[1])
def test_proto_fields(validator):
    from ideogram4_engine.serve.pb import ideogram4_pb2 as pb
    from ideogram4_engine.serve.request import from_proto

    r = from_proto(pb.GenerateRequest(prompt="a"), LIMITS)
    assert (r.n, r.width, r.height, r.preset, r.steps, r.guidance, r.output_format) == (1, 256, 256, None, None,
                                                                                         None, "png")
    r = from_proto(pb.GenerateRequest(prompt="a", n=2, width=512, height=256, seed=0, steps=2, guidance=[1, 2],
                                      output_format="jpeg", timeout_s=3), LIMITS)
    assert (r.n, r.width, r.height, r.seed, r.steps, r.guidance, r.output_format, r.timeout_s) == \
        (2, 512, 256, 0, 2, (1.0, 2.0), "jpeg", 3.0)
    with pytest.raises(InvalidRequest, match="n=0 outside 1…4"):
        validator.check(from_proto(pb.GenerateRequest(prompt="a", n=0), LIMITS))
    with pytest.raises(InvalidRequest, match=r"mu=NaN must be a finite number"):
        from_proto(pb.GenerateRequest(prompt="a", mu=float("nan")), LIMITS)


def test_generated_code_matches_the_proto(tmp_path):
    """serve/pb/ is what grpcio-tools makes of proto/ideogram4.proto today (no hand edits, no drift)."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (the serve extra)")
    from ideogram4_engine.serve import codegen

    for new in codegen.generate(tmp_path):
        assert new.read_bytes() == (codegen.PACKAGE_DIR / new.name).read_bytes(), new.name


@pytest.mark.skipif(not have_serve()[0], reason=have_serve()[1])
def test_serve_options_from_a_mapping_are_checked_like_flags(tiny_engines):
    """The application builder (KubeRay, `serve run`) takes the command line's flags as a mapping."""
    from ideogram4_engine.serve.cli import config_from_mapping

    config, _ = config_from_mapping({"engines": str(tiny_engines), "backend": "onnxruntime-cpu", "max_queue": 32,
                                     "max_replicas": "4", "default_size": "512x256", "dequantize_at_load": True,
                                     "cfg_parallel": False})
    assert (config.max_queue, config.replicas, config.max_replicas, config.gpus_per_replica) == (32, 1, 4, None)
    assert (config.limits.default_width, config.limits.default_height) == (512, 256)
    assert config.pipeline_options == {"dequantize_at_load": True, "threads": 1}
    for bad, message in [({"max_queue": "many"}, "argument --max-queue: invalid int value: 'many'"),
                         ({"default_size": "100x256"}, "width=100 must be a multiple of 16"),
                         ({"max_replicas": 0}, "--max-replicas=0 is below --replicas=1"),
                         ({"cfg_parallel": True}, "--cfg-parallel needs --backend onnxruntime-cuda"),
                         ({"colour": "red"}, "unrecognized arguments: --colour red")]:
        with pytest.raises(ValueError) as e:
            config_from_mapping({"engines": str(tiny_engines), "backend": "onnxruntime-cpu", **bad})
        assert message in str(e.value) and "\n" not in str(e.value)


def test_the_plain_runtime_never_imports_ray(tiny_engines):
    """`ideogram4 generate/info` carry the `serve` subcommand but import nothing of the server until it runs."""
    import subprocess
    import sys

    code = f"""
import sys
from ideogram4_engine.runtime.cli import main
from ideogram4_engine.serve.request import Validator
assert main(["info", "--engines", {str(tiny_engines)!r}]) == 0
Validator({str(tiny_engines)!r})
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "fastapi", "grpc", "starlette")))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout
