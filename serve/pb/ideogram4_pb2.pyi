from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "n", "width", "height", "seed", "preset", "steps", "guidance", "mu", "std", "output_format", "timeout_s")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    n: int
    width: int
    height: int
    seed: int
    preset: str
    steps: int
    guidance: _containers.RepeatedScalarFieldContainer[float]
    mu: float
    std: float
    output_format: str
    timeout_s: float
    def __init__(self, prompt: _Optional[str] = ..., n: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., preset: _Optional[str] = ..., steps: _Optional[int] = ..., guidance: _Optional[_Iterable[float]] = ..., mu: _Optional[float] = ..., std: _Optional[float] = ..., output_format: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mime_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_s", "text_encoder_s", "denoise_s", "vae_s", "encode_s", "total_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_S_FIELD_NUMBER: _ClassVar[int]
    DENOISE_S_FIELD_NUMBER: _ClassVar[int]
    VAE_S_FIELD_NUMBER: _ClassVar[int]
    ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    text_encoder_s: float
    denoise_s: float
    vae_s: float
    encode_s: float
    total_s: float
    def __init__(self, queue_s: _Optional[float] = ..., text_encoder_s: _Optional[float] = ..., denoise_s: _Optional[float] = ..., vae_s: _Optional[float] = ..., encode_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "seed", "preset", "steps", "guidance", "width", "height", "synthetic", "timings", "replica")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    seed: int
    preset: str
    steps: int
    guidance: _containers.RepeatedScalarFieldContainer[float]
    width: int
    height: int
    synthetic: bool
    timings: Timings
    replica: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., seed: _Optional[int] = ..., preset: _Optional[str] = ..., steps: _Optional[int] = ..., guidance: _Optional[_Iterable[float]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., synthetic: _Optional[bool] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., replica: _Optional[str] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("queued", "progress", "result")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    progress: Progress
    result: GenerateResponse
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...
