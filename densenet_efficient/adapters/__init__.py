"""Adapters that let ``densenet_efficient.convert`` take other libraries'
dense blocks: one small module per library. Each has

* ``block_classes()``: the dense block classes it converts (none when the
  library is not installed);
* ``check(path, block, mode)``: raises ValueError naming the module when the
  block cannot be converted; changes nothing;
* ``dense_layers(block, mode)``: the block's layers as our ``DenseLayer``s
  built around the very same Parameter and buffer objects, in order;
* ``transition_parts(module)``: when `module` is one of its transitions
  (BN-ReLU-Conv1x1-AvgPool), its parts as norm, relu, conv and pool (the
  same modules, or a BatchNorm on the same tensors and a ReLU where the
  library fuses the two), which become our ``Transition``; else None.
"""

from . import monai, timm, torchvision

ADAPTERS = (torchvision, timm, monai)
