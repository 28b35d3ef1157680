"""The encoders the benchmarks time: students, SAM's ViTs and peer encoders, with random weights
(latency does not depend on them)."""

from __future__ import annotations

import torch
from torch import nn

from students import build_student, list_students

SAM_SIZES = ("vit_b", "vit_l", "vit_h")
PEERS = {"mobilesam_vit_t": 1024, "efficientvit_sam_l0": 512, "efficientvit_sam_xl0": 1024}


# --- encoders --------------------------------------------------------------------------------


def known_models() -> list[str]:
    return [*list_students(), *SAM_SIZES, *PEERS]


def random_init_(module: nn.Module) -> nn.Module:
    """Small random values everywhere (fast even for ViT-H; no denormals to slow the CPU)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def build_encoder(name: str, image_size: int, device: str) -> tuple[nn.Module, int]:
    """(encoder in eval mode, its input side): students and SAM at `image_size`, peers native."""
    if name in list_students():
        return build_student(name, img_size=image_size).to(device).eval(), image_size
    if name in SAM_SIZES:
        from segment_anything import sam_model_registry

        with torch.device("meta"):
            encoder = sam_model_registry[name]().image_encoder
        if image_size != 1024:
            raise ValueError(
                f"{name} is measured at its native 1024 only (its position embedding is fixed)"
            )
        return random_init_(encoder.to_empty(device=device)).eval(), 1024
    if name == "mobilesam_vit_t":
        try:
            from mobile_sam.build_sam import build_sam_vit_t
        except ImportError as err:
            raise ValueError(
                "mobilesam_vit_t needs the bench extra: pip install -e '.[bench]'"
            ) from err
        return build_sam_vit_t().image_encoder.to(device).eval(), PEERS[name]
    if name.startswith("efficientvit_sam_"):
        try:
            from efficientsam.sam_model_zoo import create_efficientvit_sam_model
        except ImportError as err:
            raise ValueError(f"{name} needs the bench extra: pip install -e '.[bench]'") from err
        zoo_name = name.replace("_sam_", "-sam-").replace("_", "-")
        return create_efficientvit_sam_model(zoo_name, pretrained=False).image_encoder.to(
            device
        ).eval(), PEERS[name]
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known_models())}")


def check_names(flag: str, names: tuple[str, ...], known: list[str]) -> None:
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"{flag}: unknown {unknown}; known: {', '.join(known)}")
