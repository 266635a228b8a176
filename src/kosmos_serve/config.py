"""Settings: every default lives here; `KOSMOS_*` environment variables and CLI flags override them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kosmos_serve.generation import MAX_NEW_TOKENS_LIMIT, MaxNewTokens, NoRepeatNgramSize

DEFAULT_MODEL = "microsoft/kosmos-2-patch14-224"


class EngineSettings(BaseSettings):
    """How the model is loaded and run."""

    model_config = SettingsConfigDict(env_prefix="KOSMOS_", extra="ignore")

    model: str = Field(DEFAULT_MODEL, description="Hub id or local folder written by save_pretrained.")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), or a torch device such as cuda:1.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 (or float16) on GPU."
    )
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="Attention implementation.")
    quantize: Literal["none", "int8", "auto"] = Field(
        "none", description="int8: linear layers with int8 weights and dynamic int8 activations, quantized per row "
                            "(CPU only). auto: per part (vision, text) the format measured fastest on this CPU kind "
                            "(the choice for speed; float32 weights on the CPU, else the loaded dtype)."
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: the cores, shared among workers).")
    max_batch_size: int = Field(8, ge=1, description="Most prompts (rows) decoding together in the running batch.")
    image_cache_size: int = Field(128, ge=0, description="Images whose vision features are kept (0: no cache).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest accepted image, in pixels.")
    max_new_tokens: MaxNewTokens | None = Field(
        None, description="New tokens generated when a request does not say (unset: the model's default, else 128)."
    )
    no_repeat_ngram_size: NoRepeatNgramSize | None = Field(
        None, description="Default of no_repeat_ngram_size (unset: the model's default, else the original demo's 3)."
    )
    max_new_tokens_cap: int = Field(
        1024, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Most new tokens a request may ask for."
    )
    max_prompt_chars: int = Field(2000, ge=1, description="Longest accepted prompt or question, in characters.")

