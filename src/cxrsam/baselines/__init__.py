"""CNN baselines (U-Net, DeepLabv3+): models (:mod:`cxrsam.baselines.models`), mask post-processing
(:mod:`cxrsam.baselines.postprocess`) and draft-mask prediction in PyTorch (:mod:`cxrsam.baselines.predict`) or
ONNX Runtime (:mod:`cxrsam.baselines.onnx_cnn`). Nothing is imported here: importing segmentation_models_pytorch
(timm, torchvision) takes seconds that drafts from a cached ONNX export never need."""
