from pipeline.backbones.factory import Backbone, InputSpec, create_backbone, register_family

__all__ = ["Backbone", "InputSpec", "create_backbone", "register_family"]
