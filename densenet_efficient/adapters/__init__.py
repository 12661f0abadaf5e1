"""Adapters that let ``densenet_efficient.convert`` take other libraries'
dense blocks: one small module per library. Each has

* ``block_classes()``: the dense block classes it converts (none when the
  library is not installed);
* ``check(path, block, mode)``: raises ValueError naming the module when the
  block cannot be converted; changes nothing;
* ``dense_layers(block, mode)``: the block's layers as our ``DenseLayer``s
  built around the very same Parameter and buffer objects, in order;
* ``transition_classes()``: its transition classes that hold norm, relu,
  conv and pool (BN-ReLU-Conv1x1-AvgPool), which become our ``Transition``.
"""

from . import monai, timm, torchvision

ADAPTERS = (torchvision, timm, monai)
