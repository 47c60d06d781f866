from megatron_dflash.targets.capture import FeatureCapture, target_forward  # noqa: F401
from megatron_dflash.targets.hf_checkpoint import HFCheckpoint, hf_tensor  # noqa: F401
from megatron_dflash.targets.hf_import import (build_target, freeze, load_hf_config,  # noqa: F401
                                              load_hf_weights, target_family,
                                              target_transformer_config)
