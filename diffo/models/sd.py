"""Stable Diffusion 2.1's VAE and UNet shapes (the diffusers configs of SD 2.1 / 2.1-base), shared by the families
that run on it: random-weight timing where no checkpoint can be downloaded, and the shapes a converted
checkpoint must have."""

SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=768,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], scaling_factor=0.18215,
)
SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
)
SD21_BASE_UNET = dict(SD21_UNET, sample_size=64)  # 2.1-base: 512 px, epsilon prediction
