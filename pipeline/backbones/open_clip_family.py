"""open_clip backbones (CLIP and CoCa): image and text towers, tokenizer, cached class embeddings.

``open_clip:NAME`` builds ``open_clip.create_model(NAME)``; ``pretrained`` is its pretrained tag
(``openai``, ``laion2b_s34b_b88k``, ... for users with network or a cache); ``checkpoint`` loads a
local file. strata's tiny test configs (``strata-tiny-clip``, ``strata-tiny-coca``) are
registered through open_clip's own config mechanism.

open_clip is imported when a backbone of this family is first built, not with this module: it
takes seconds, and every Ray worker imports the methods (and so this module) whatever backbone
the run uses.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from pipeline.backbones.factory import Backbone, InputSpec, load_checkpoint, register_family, timm_attention_sites
from pipeline.backbones.hooks import AttentionKind
from pipeline.config import BackboneConfig
from pipeline.errors import ConfigError

DEFAULT_TEMPLATE = "a photo of a {}."


class ClipBackbone(Backbone):
    """A dual encoder: ``features`` is the image embedding, ``encode_text`` the text embedding.

    Towers may be open_clip's own transformers, a timm model as image tower (``vision_cfg.
    timm_model_name``: its ``trunk`` is a timm ViT) or a Hugging Face BERT as text tower
    (``text_cfg.hf_model_name``); the hooks find each tower's attention modules either way.
    """

    def __init__(self, name: str, model: nn.Module, tokenizer, input_spec: InputSpec) -> None:
        visual = model.visual
        output_dim = visual.output_dim if hasattr(visual, "output_dim") else visual.head.proj.out_features
        super().__init__(name, model, int(output_dim), input_spec)
        self._timm_trunk: nn.Module | None = getattr(visual, "trunk", None)
        self.token_dim = int(self._timm_trunk.embed_dim if self._timm_trunk is not None else visual.transformer.width)
        self.tokenizer = tokenizer
        self._class_cache: dict[tuple[tuple[str, ...], str], torch.Tensor] = {}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self._timm_trunk is not None and hasattr(self.model, "text_decoder"):
            # open_clip's CoCa unpacks (embedding, tokens) from its image tower; a timm tower gives the embedding alone
            return nn.functional.normalize(self.model.visual(images), dim=-1)
        return self.model.encode_image(images)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's whole token sequence after its final norm (B, N, width), CLS and any
        inserted prompts included (open_clip's own ``output_tokens`` drops position 0)."""
        if self._timm_trunk is not None:
            return self._timm_trunk.forward_features(images)
        captured: list[torch.Tensor] = []
        handle = self.model.visual.ln_post.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            self.model.visual(images)
        finally:
            handle.remove()
        return captured[0]

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned temperature, exp(logit_scale)."""
        return self.model.logit_scale.exp()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def class_embeddings(self, class_names: list[str] | tuple[str, ...], template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
        """L2-normalised text embeddings of ``template`` filled with each class name.

        Cached per (names, template) while no adapter is routed; a routed text tower recomputes.
        """
        key = (tuple(class_names), template)
        if self.routing.slots is not None:
            return nn.functional.normalize(self.encode_text([template.format(c) for c in class_names]), dim=-1)
        if key not in self._class_cache:
            with torch.no_grad():
                self._class_cache[key] = nn.functional.normalize(
                    self.encode_text([template.format(c) for c in class_names]), dim=-1
                )
        return self._class_cache[key]

    def _tower(self, tower: str) -> nn.Module:
        if tower == "image":
            return self.model.visual
        if tower == "text":
            return self.model.text if hasattr(self.model, "text") else self.model.transformer
        raise ValueError(f"{self.name} has no {tower} tower")

    def _attention_sites(self, tower: str) -> list[tuple[nn.Module, str, AttentionKind]]:
        from open_clip.transformer import ResidualAttentionBlock

        root = self._tower(tower)
        if tower == "image" and self._timm_trunk is not None:
            return timm_attention_sites(self._timm_trunk)
        if hasattr(root, "transformer") and hasattr(root, "pooler"):  # an HF text encoder (BERT family)
            return [(parent, "self", "bert") for parent in root.modules() if hasattr(getattr(parent, "self", None), "query")]
        return [
            (block, "attn", "mha")
            for block in root.modules()
            if isinstance(block, ResidualAttentionBlock) and not hasattr(block, "ln_1_kv")  # self-attention only
        ]

    def _token_module(self) -> nn.Module:
        return self._timm_trunk.patch_drop if self._timm_trunk is not None else self.model.visual.patch_dropout

    def _cls_position(self) -> torch.Tensor:
        if self._timm_trunk is not None:
            return self._timm_trunk.pos_embed[0, 0]
        return self.model.visual.positional_embedding[0]


CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip looks for in a local-dir: folder


def loads_weights(model_name: str, pretrained: str | None) -> bool:
    """Whether ``open_clip.create_model(model_name, pretrained)`` loads a full checkpoint: a
    pretrained tag, an hf-hub: model (its weights, or an error), a local-dir: folder holding one."""
    if pretrained or model_name.startswith("hf-hub:"):
        return True
    if model_name.startswith("local-dir:"):
        folder = Path(model_name.removeprefix("local-dir:"))
        return any(path.suffix in CHECKPOINT_SUFFIXES for path in folder.iterdir()) if folder.is_dir() else False
    return False


def local_dir_files(model_name: str) -> list[Path]:
    """A ``local-dir:`` model's files (its config and weights), which open_clip reads to build it."""
    if not model_name.startswith("local-dir:"):
        return []
    folder = Path(model_name.removeprefix("local-dir:"))
    return sorted(path for path in folder.iterdir() if path.is_file()) if folder.is_dir() else []


@cache
def open_clip_library() -> ModuleType:
    """open_clip, imported once, with strata's own model configs added."""
    import open_clip

    open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")
    return open_clip


@register_family("open_clip", local_files=local_dir_files)
def _open_clip(model_name: str, cfg: BackboneConfig) -> Backbone:
    open_clip = open_clip_library()
    pretrained = cfg.pretrained if isinstance(cfg.pretrained, str) else None
    if cfg.pretrained is True:
        raise ConfigError("backbone.pretrained: open_clip needs a pretrained tag (e.g. 'openai'), not true")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, **cfg.kwargs)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        if pretrained and "download" in str(exc).lower():
            raise ConfigError(
                f"backbone.pretrained: {model_name} tag {pretrained!r}: weights not in the local cache and not "
                "downloadable; this needs network, or a local backbone.checkpoint"
            ) from None
        raise ConfigError(f"backbone: open_clip cannot build {model_name!r}: {str(exc).splitlines()[0]}") from None
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None and decoder.text_projection is not None and not loads_weights(model_name, pretrained):
        # open_clip leaves CoCa's vocabulary projection as torch.empty (MultimodalTransformer's
        # init_parameters names a missing attribute and is never called): without weights to load
        # it would be whatever the allocator returned, a decoder blind to the image. Only then:
        # weights open_clip loaded (a tag, hf-hub:, a local-dir: with a checkpoint) stay as loaded.
        nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)
    if cfg.checkpoint:
        load_checkpoint(model, cfg)
    model.eval()
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    spec = InputSpec(
        size=int(size),
        mean=tuple(visual.image_mean or open_clip.OPENAI_DATASET_MEAN),
        std=tuple(visual.image_std or open_clip.OPENAI_DATASET_STD),
    )
    # A local-dir model is named by its folder, not its path, so moving the folder keeps its id.
    shown = f"local-dir:{Path(model_name.removeprefix('local-dir:')).name}" if model_name.startswith("local-dir:") else model_name
    name = f"open_clip:{shown}" + (f".{pretrained}" if pretrained else "")
    return ClipBackbone(name, model, open_clip.get_tokenizer(model_name), spec)
