# Stage 3 of GKD in mmsegmentation: a Mask2Former decoder on a frozen gkd ViT-S/16 encoder, trained
# on GTA5 (19 Cityscapes classes), evaluated on Cityscapes val.
#
# The settings are the authors' (task_learning/configs/frozen_vfms/deit_vit-S_mask2former.py and its
# _base_ files in github.com/Younger-hua/GKD): 512x512 crops, batch 4, 40k iterations, AdamW 1e-4,
# poly 0.9, blocks [3, 5, 7, 11] resized to strides 4-32, Mask2Former with 100 queries, sliding
# window 512 / stride 341. Differences: the authors' FrozenBackboneEncoderDecoder and
# PEFTOptimWrapperConstructor are replaced by mmseg's EncoderDecoder and the default optimiser
# constructor (the backbone freezes itself: its parameters do not require grad), and their
# multi-target DGIoUMetric by mmseg's IoUMetric on Cityscapes (add BDD100K / Mapillary val sets as
# further ConcatDataset entries to match their table).
#
# Needs mmsegmentation 1.x, mmdet 3.x and the full mmcv (the pixel decoder's deformable attention is a
# compiled op). Run: python tools/train.py configs/mmseg/gkd_vits_mask2former_gta5.py
#   --cfg-options model.backbone.checkpoint=runs/stage2/encoder.safetensors
custom_imports = dict(imports=["gkd.integrations.mmseg"], allow_failed_imports=False)

encoder_file = "runs/stage2/encoder.safetensors"  # a gkd stage-2 encoder (or `gkd import-official` output)
embed_dim = 384  # ViT-S
num_classes = 19
crop_size = (512, 512)

model = dict(
    type="EncoderDecoder",
    # The backbone does not normalise: this does, with the encoder file's input_norm x 255 (ImageNet's
    # for gkd's and the authors' students; gkd.integrations.mmseg.data_preprocessor_norm reads it).
    data_preprocessor=dict(
        type="SegDataPreProcessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        size=crop_size,
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
    ),
    backbone=dict(type="GKDEncoder", checkpoint=encoder_file, layers=[3, 5, 7, 11], frozen=True),
    decode_head=dict(
        type="Mask2FormerHead",
        in_channels=[embed_dim] * 4,
        strides=[4, 8, 16, 32],
        feat_channels=256,
        out_channels=256,
        num_classes=num_classes,
        num_queries=100,
        num_transformer_feat_level=3,
        align_corners=False,
        pixel_decoder=dict(
            type="mmdet.MSDeformAttnPixelDecoder",
            num_outs=3,
            norm_cfg=dict(type="GN", num_groups=32),
            act_cfg=dict(type="ReLU"),
            encoder=dict(
                num_layers=6,
                layer_cfg=dict(
                    self_attn_cfg=dict(embed_dims=256, num_heads=8, num_levels=3, num_points=4, im2col_step=64,
                                       dropout=0.0, batch_first=True, norm_cfg=None, init_cfg=None),
                    ffn_cfg=dict(embed_dims=256, feedforward_channels=1024, num_fcs=2, ffn_drop=0.0,
                                 act_cfg=dict(type="ReLU", inplace=True)),
                ),
                init_cfg=None,
            ),
            positional_encoding=dict(num_feats=128, normalize=True),
            init_cfg=None,
        ),
        enforce_decoder_input_project=False,
        positional_encoding=dict(num_feats=128, normalize=True),
        transformer_decoder=dict(
            return_intermediate=True,
            num_layers=9,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=256, num_heads=8, attn_drop=0.0, proj_drop=0.0, dropout_layer=None,
                                   batch_first=True),
                cross_attn_cfg=dict(embed_dims=256, num_heads=8, attn_drop=0.0, proj_drop=0.0, dropout_layer=None,
                                    batch_first=True),
                ffn_cfg=dict(embed_dims=256, feedforward_channels=2048, num_fcs=2,
                             act_cfg=dict(type="ReLU", inplace=True), ffn_drop=0.0, dropout_layer=None,
                             add_identity=True),
            ),
            init_cfg=None,
        ),
        loss_cls=dict(type="mmdet.CrossEntropyLoss", use_sigmoid=False, loss_weight=2.0, reduction="mean",
                      class_weight=[1.0] * num_classes + [0.1]),  # the last entry: "no object"
        loss_mask=dict(type="mmdet.CrossEntropyLoss", use_sigmoid=True, reduction="mean", loss_weight=5.0),
        loss_dice=dict(type="mmdet.DiceLoss", use_sigmoid=True, activate=True, reduction="mean", naive_dice=True,
                       eps=1.0, loss_weight=5.0),
        train_cfg=dict(
            num_points=12544,
            oversample_ratio=3.0,
            importance_sample_ratio=0.75,
            assigner=dict(
                type="mmdet.HungarianAssigner",
                match_costs=[
                    dict(type="mmdet.ClassificationCost", weight=2.0),
                    dict(type="mmdet.CrossEntropyLossCost", weight=5.0, use_sigmoid=True),
                    dict(type="mmdet.DiceCost", weight=5.0, pred_act=True, eps=1.0),
                ],
            ),
            sampler=dict(type="mmdet.MaskPseudoSampler"),
        ),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)

# -- data: GTA5 (train) -> Cityscapes (val); label files hold Cityscapes train ids -------------------
dataset_type = "CityscapesDataset"
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    # short side 512 x {0.5, 0.6, ..., 2.0}, long side at most 2048
    dict(type="RandomChoiceResize", scales=[int(512 * x * 0.1) for x in range(5, 21)],
         resize_type="ResizeShortestEdge", max_size=2048),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(1024, 512), keep_ratio=True),
    dict(type="LoadAnnotations"),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(type=dataset_type, data_root="data/GTA5/", data_prefix=dict(img_path="images", seg_map_path="labels"),
                 img_suffix=".png", seg_map_suffix="_labelTrainIds.png", pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(type=dataset_type, data_root="data/cityscapes/",
                 data_prefix=dict(img_path="leftImg8bit/val", seg_map_path="gtFine/val"), pipeline=test_pipeline),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator

# -- schedule: AdamW 1e-4, poly 0.9 over 40k iterations; no decay on norms and query/level embeddings ----
no_decay = dict(lr_mult=1.0, decay_mult=0.0)
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, weight_decay=0.05, eps=1e-8, betas=(0.9, 0.999)),
    paramwise_cfg=dict(
        custom_keys={"query_embed": no_decay, "query_feat": no_decay, "level_embed": no_decay,
                     "norm": dict(decay_mult=0.0)},
        norm_decay_mult=0.0,
    ),
)
param_scheduler = [dict(type="PolyLR", eta_min=0, power=0.9, begin=0, end=40000, by_epoch=False)]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=40000, val_interval=4000)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

# -- runtime ---------------------------------------------------------------------------------------
default_scope = "mmseg"
env_cfg = dict(cudnn_benchmark=True, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="nccl"))
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=4000),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
