"""Settings: every default lives here; environment variables and CLI flags are two sources of the same model.

`EngineSettings` is what the engine reads (how the model is loaded and run), `ServerSettings` what the HTTP
service reads (how it listens, batches requests and limits them); `Settings` is both, the one object a
process builds (`Settings(**flags)`: flags given, else the environment, else the default here).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kosmos_serve.generation import MAX_NEW_TOKENS_LIMIT, MaxNewTokens, MinScore, NmsIou, NoRepeatNgramSize

DEFAULT_MODEL = "microsoft/kosmos-2-patch14-224"
INT4_GROUP_SIZES = (32, 64, 128)


class EngineSettings(BaseSettings):
    """How the model is loaded and run."""

    model_config = SettingsConfigDict(env_prefix="KOSMOS_", extra="ignore", populate_by_name=True)

    model: str = Field(DEFAULT_MODEL, description="Hub id or local folder written by save_pretrained.")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), or a torch device such as cuda:1.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 (or float16) on GPU."
    )
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="Attention implementation.")
    quantize: Literal["none", "int8", "int4", "auto"] = Field(
        "none", description="int8: linear layers with int8 weights and dynamic int8 activations, quantized per row "
                            "(CPU only). int4: the text decoder's linear layers with 4-bit weights in groups "
                            "(int4_group_size inputs each) and bfloat16 activations, the vision part as int8 (CPU "
                            "only; fast where the CPU has AVX512-BF16 or AMX). auto: per part (vision, text) the "
                            "format measured fastest on this CPU kind (the choice for speed; float32 weights on the "
                            "CPU, else the loaded dtype)."
    )
    int4_group_size: int = Field(
        64, description="Inputs sharing one scale and offset in int4 weights: 32, 64 or 128 (smaller: closer to "
                        "float32, a little more to read)."
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: the cores, shared among workers).")
    max_batch_rows: int = Field(
        8, ge=1, validation_alias="KOSMOS_MAX_BATCH_SIZE",
        description="Most prompts (rows) decoding together in the running batch.",
    )
    image_cache_size: int = Field(128, ge=0, description="Images whose vision features are kept (0: no cache).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest accepted image, in pixels.")
    max_new_tokens: MaxNewTokens | None = Field(
        None, description="New tokens generated when a request does not say (unset: the model's default, else 128)."
    )
    no_repeat_ngram_size: NoRepeatNgramSize | None = Field(
        None, description="Default of no_repeat_ngram_size (unset: the model's default, else the original demo's 3)."
    )
    min_score: MinScore | None = Field(
        None, description="Boxes scored under this are dropped: by default for detection, Label Studio, Supervisely "
                          "and annotate, for other tasks when a request asks (unset: the model's default, else 0.1).",
    )
    nms_iou: NmsIou | None = Field(
        None, description="Of two boxes of different phrases overlapping by more than this IoU, the lower-scored is "
                          "dropped: by default for detection, Label Studio, Supervisely and annotate's detection, for "
                          "other tasks when a request asks (1: off; unset: the model's default, else 0.5).",
    )
    max_new_tokens_cap: int = Field(
        1024, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Most new tokens a request may ask for."
    )
    max_prompt_chars: int = Field(2000, ge=1, description="Longest accepted prompt or question, in characters.")
    segmenter: str | None = Field(
        None, min_length=1,
        description="Segment Anything model (hub id, folder, or demo) that gives each box a mask when a request asks "
                    "for masks; loaded beside Kosmos-2, on its device and threads (unset: none, masks refused).",
    )

    @field_validator("int4_group_size")
    @classmethod
    def _check_int4_group_size(cls, value: int) -> int:
        """One of the group sizes that divide every Kosmos-2 layer's inputs and that the int4 kernel takes."""
        if value not in INT4_GROUP_SIZES:
            raise ValueError(f"int4_group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; got {value}")
        return value


class ServerSettings(BaseSettings):
    """How the HTTP service listens, batches and limits requests (the engine has its own settings)."""

    model_config = SettingsConfigDict(env_prefix="KOSMOS_", extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in the Docker image).")
    port: int = Field(8000, ge=1, le=65535, validation_alias="PORT", description="TCP port.")
    log_level: str = Field("INFO", validation_alias="LOG_LEVEL", description="Python logging level.")
    num_api_servers: int = Field(
        1, ge=1, validation_alias="NUM_API_SERVERS",
        description="Worker processes, each with its own copy of the model and a share of the CPU threads.",
    )
    max_batch_requests: int = Field(
        2, ge=1, validation_alias="MAX_BATCH_SIZE",
        description="Most requests decoding together in the running batch; more wait in the queue and join as "
                    "others finish (the reference's default; 8 for throughput).",
    )
    default_prompt: str | None = Field(
        None, min_length=1, validation_alias="DEFAULT_PROMPT",
        description="Prompt of `POST /predict` when the request sends none (unset: the model's `default_prompt`, "
                    "else the reference's `<grounding> Describe this image:`).",
    )
    batch_timeout_ms: float = Field(
        10.0, ge=0, description="When the engine is idle, how long its first arrival waits for others to prefill with "
                                "it; requests arriving while a batch decodes join it at the next step without waiting.",
    )
    stream_interval_ms: float = Field(
        20.0, ge=0, description="When decode steps come faster than this, a streamed request's new tokens reach its "
                                "connection together at most this often (each wake-up of the event loop costs the "
                                "engine thread); 0: every token at once. The text streamed is the same.",
    )
    max_queue: int = Field(64, ge=1, description="Requests waiting at most; beyond it: 503 with Retry-After.")
    request_timeout_s: float = Field(300.0, gt=0, description="Longest a request may wait and run; then 504.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest request body (413 beyond).")
    api_key: SecretStr | None = Field(
        None,
        description="When set, every route but /health and /ready needs `Authorization: Bearer <key>` or `X-API-Key`.",
    )
    allowed_image_hosts: Annotated[list[str], NoDecode] = Field(
        [], description="Hosts whose http(s) image URLs requests may name (comma-separated); by default none: the "
                        "service fetches nothing.",
    )
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="Longest an allowed image URL may take to fetch.")
    warmup: bool = Field(True, description="Run one tiny generation before /ready answers 200.")
    demo: bool = Field(True, description="Serve the web demo at /demo when gradio is installed (`.[demo]`).")
    # The Label Studio ML backend (server/label_studio/) reads Label Studio's own variable names.
    label_studio_url: str | None = Field(
        None, validation_alias=AliasChoices("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"),
        description="Label Studio's address (http://host:8080); its uploads and local files are fetched from it, "
                    "and from no other host.",
    )
    label_studio_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
        description="Label Studio token sent when fetching its images: a legacy token, or a personal access token.",
    )
    label_studio_local_files_document_root: str | None = Field(
        None, validation_alias=AliasChoices("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "LOCAL_FILES_DOCUMENT_ROOT"),
        description="Folder that Label Studio's local-files URLs (/data/local-files/?d=...) are read from when they "
                    "are there (as Label Studio's own setting); nothing outside it is read.",
    )

    @field_validator("allowed_image_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        """`a.example, b.example:8080` (the environment's form) -> a list of hosts."""
        if isinstance(value, str):
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    @field_validator("label_studio_url")
    @classmethod
    def _check_label_studio_url(cls, value: str | None) -> str | None:
        """Label Studio's address as the SDK takes it: http(s)://host[:port][/path]."""
        if value is not None and not value.lower().startswith(("http://", "https://")):
            raise ValueError(f"LABEL_STUDIO_URL must start with http:// or https:// (e.g. http://127.0.0.1:8080); "
                             f"got {value!r}")
        return value.rstrip("/") if value else None


class Settings(ServerSettings, EngineSettings):
    """Every setting of a process, engine and service alike: built once, from flags over the environment."""

    model_config = SettingsConfigDict(env_prefix="KOSMOS_", extra="ignore", populate_by_name=True)
