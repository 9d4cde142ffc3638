from .dat import MODEL_CONFIGS, DeformableAttentionTransformer
