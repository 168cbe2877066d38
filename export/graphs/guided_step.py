"""The guided Euler update as a tiny graph, so the sampler state can stay on the device between steps.

z' = z + (g·v_c + (1 − g)·v_u)·dt, all fp32, in exactly the reference's operation order (spec §5.3). g and
1 − g are inputs (the host forms 1 − g in float64 and rounds it, as the reference's Python scalar does).
"""
from __future__ import annotations

from ...runtime.contract import TOKEN_CHANNELS
from .builder import F32, GraphBuilder

SHAPE = ["batch", "image_tokens", TOKEN_CHANNELS]


def build_guided_step() -> GraphBuilder:
    g = GraphBuilder("guided_step")
    z = g.input("latents", F32, SHAPE)
    v_c = g.input("velocity_cond", F32, SHAPE)
    v_u = g.input("velocity_uncond", F32, SHAPE)
    gs = g.input("guidance", F32, [1])
    one_minus = g.input("one_minus_guidance", F32, [1])
    dt = g.input("dt", F32, [1])
    v = g.op("Add", g.op("Mul", v_c, gs), g.op("Mul", v_u, one_minus))
    g.output(g.op("Add", z, g.op("Mul", v, dt)), "next_latents", F32, SHAPE)
    return g
