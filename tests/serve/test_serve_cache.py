"""serve hands the first-block cache options to the replicas (issue 21)."""
import pytest

from ideogram4_engine.runtime.cache import CacheOptions


def test_serve_passes_the_cache_options(tiny_engines):
    """`ideogram4 serve --cache-threshold …` hands the replicas' Pipelines the same CacheOptions."""
    from serve_server import have_serve
    if not have_serve()[0]:
        pytest.skip(have_serve()[1])
    from ideogram4_engine.serve.cli import config_from_mapping
    config, _ = config_from_mapping({"engines": str(tiny_engines), "backend": "onnxruntime-cpu",
                                     "cache_threshold": "0.1", "cache_max_consecutive": 2, "cache_taylor": True})
    assert config.pipeline_options["cache"] == CacheOptions(0.1, 2, 2, True)
    config, _ = config_from_mapping({"engines": str(tiny_engines), "backend": "onnxruntime-cpu"})
    assert "cache" not in config.pipeline_options
    with pytest.raises(ValueError, match="--cache-taylor needs --cache-threshold"):
        config_from_mapping({"engines": str(tiny_engines), "backend": "onnxruntime-cpu", "cache_taylor": True})
