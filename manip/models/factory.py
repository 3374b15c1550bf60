"""Constructors for the tiny Stable Diffusion's components: the real diffusers and
transformers classes, only smaller, so every downstream tool loads them unchanged."""
from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from .tokenizer import MAX_LENGTH

VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407


def make_vae(block_out_channels, layers_per_block: int, latent_channels: int, norm_num_groups: int, sample_size: int) -> AutoencoderKL:
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups, sample_size=sample_size,
        # Fully convolutional, so training on crops is exact for full images.
        mid_block_add_attention=False,
    )


def make_unet(block_out_channels, layers_per_block: int, attention_head_dim: int, cross_attention_dim: int,
              in_channels: int, sample_size: int, linear_projection: bool = False) -> UNet2DConditionModel:
    """Cross-attention at every resolution below the first, like SD's outer ResNet-only level;
    `linear_projection`: the transformers' in/out projections are linear layers, as in SD 2.x."""
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=32, use_linear_projection=linear_projection,
    )


def text_config(hidden_size: int, layers: int, heads: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_LENGTH,
        projection_dim=projection_dim, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
        hidden_act="quick_gelu",
    )


def make_clip(hidden_size: int, layers: int, heads: int, projection_dim: int, vision_hidden_size: int,
              vision_layers: int, patch_size: int, image_size: int) -> CLIPModel:
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=4 * vision_hidden_size,
        num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_hidden_size // 32),
        image_size=image_size, patch_size=patch_size, projection_dim=projection_dim, hidden_act="quick_gelu",
    )
    cfg = CLIPConfig(
        text_config=text_config(hidden_size, layers, heads, projection_dim).to_dict(),
        vision_config=vision.to_dict(), projection_dim=projection_dim,
    )
    model = CLIPModel(cfg)
    # Tokens absent from the world's captions never receive a gradient; starting them at zero
    # keeps the shipped embedding table compressible instead of 49k rows of random noise.
    model.text_model.embeddings.token_embedding.weight.data.zero_()
    return model
