"""Vision models: every route reaches the output, shapes through every model, tiny batches overfit, MIL order
invariance with coordinates, the ResNet-18 baseline's size."""

import pytest
import torch

from medstate.errors import MedstateError
from medstate.vision.blocks import MixerSpec, VisionMambaBlock
from medstate.vision.classifier import ClassifierConfig, VisionMambaClassifier
from medstate.vision.mil import MambaMIL, MILConfig
from medstate.vision.resnet import ResNet18, ResNetConfig
from medstate.vision.scans import tokens_of
from medstate.vision.segmentation import SegmenterConfig, UMambaSegmenter


def _cross_routes(h, w):
    """VMamba's four routes as position lists, written from the definition."""
    rows = [i * w + j for i in range(h) for j in range(w)]
    cols = [i * w + j for j in range(w) for i in range(h)]
    return [rows, cols, rows[::-1], cols[::-1]]


@pytest.mark.parametrize("version", [1, 2])
def test_every_route_contributes(version):
    torch.manual_seed(0)
    block = VisionMambaBlock(8, MixerSpec(version=version, scan="cross", merge="sum", head_dim=8), spatial_dims=2)
    tokens = torch.randn(2, 15, 8)
    expected = tokens.clone()
    for route in _cross_routes(3, 5):
        order = torch.tensor(route)
        mixed = block.mixers[0](tokens[:, order], norm=block.norm)[0]  # the mixer reading this route alone
        expected += mixed[:, torch.argsort(order)]
    assert torch.allclose(block(tokens, (3, 5)), expected, atol=1e-5)


def test_separate_route_mixers_each_read_their_route():
    torch.manual_seed(0)
    spec = MixerSpec(version=1, scan="bidirectional", merge="sum", route_weights="separate")
    block = VisionMambaBlock(8, spec, spatial_dims=2)
    tokens = torch.randn(2, 12, 8)
    forward = block.mixers[0](tokens, norm=block.norm)[0]
    backward = block.mixers[1](tokens.flip(1), norm=block.norm)[0].flip(1)
    assert torch.allclose(block(tokens, (3, 4)), tokens + forward + backward, atol=1e-5)
    block(tokens, (3, 4)).square().sum().backward()
    for mixer in block.mixers:
        assert mixer.in_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "size,stem", [((28, 28), []), ((12, 20), [4, 6]), ((8, 12, 6), []), ((8, 12, 6), [4])], ids=str
)
def test_classifier_shapes(size, stem):
    config = ClassifierConfig(num_classes=3, image_size=list(size), patch_size=2, dim=16, depth=2, stem_channels=stem)
    model = VisionMambaClassifier(config)
    assert model(torch.randn(2, 1, *size)).shape == (2, 3)
    # another grid: position embeddings interpolated
    other = tuple(s + 2 for s in size)
    assert model(torch.randn(1, 1, *other)).shape == (1, 3)
    with pytest.raises(MedstateError, match="multiple of the patch size"):
        model(torch.randn(1, 1, *(s + 1 for s in size)))


@pytest.mark.parametrize("dims", [2, 3])
def test_classifier_stem_is_convolution_batchnorm_gelu_before_the_patch_embedding(dims):
    torch.manual_seed(0)
    size = [8, 6, 4][:dims] if dims == 3 else [8, 6]
    config = ClassifierConfig(num_classes=2, image_size=size, dim=16, depth=1, stem_channels=[3, 5])
    model = VisionMambaClassifier(config)
    model.train()
    model(torch.randn(4, 1, *size) * 2 + 1)  # moves the BatchNorm running statistics off their initial values
    model.eval()
    images = torch.randn(2, 1, *size)
    conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d
    x = images
    convs = [m for m in model.stem if isinstance(m, torch.nn.modules.conv._ConvNd)]
    norms = [m for m in model.stem if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert [c.out_channels for c in convs] == [3, 5]
    for c, n in zip(convs, norms):
        x = conv(x, c.weight, padding=1)  # 3×3(×3), no bias, resolution kept
        x = (x - n.running_mean.view(1, -1, *[1] * dims)) / torch.sqrt(n.running_var.view(1, -1, *[1] * dims) + n.eps)
        x = torch.nn.functional.gelu(x * n.weight.view(1, -1, *[1] * dims) + n.bias.view(1, -1, *[1] * dims))
    tokens = tokens_of(model.patch_embed(x) + model.position)
    expected = model.head(model.norm(model.blocks(tokens, model.grid)).mean(1))
    assert torch.allclose(model(images), expected, atol=1e-5)


@pytest.mark.parametrize("dims,size", [(2, (32, 48)), (3, (16, 8, 24))], ids=["2d", "3d"])
def test_segmenter_shapes(dims, size):
    config = SegmenterConfig(
        num_classes=3,
        spatial_dims=dims,
        features_per_stage=[4, 8, 16],
        strides=[1, 2, [2, 2] if dims == 2 else [2, 1, 2]],
        kernel_sizes=[3, 3, 3],
        mamba_stages=[1, 2],
        mixer=MixerSpec(scan="tri" if dims == 3 else "cross", head_dim=8),
        deep_supervision=True,
    )
    model = UMambaSegmenter(config)
    outputs = model(torch.randn(2, 1, *size))
    assert outputs[0].shape == (2, 3, *size)
    assert outputs[1].shape[2:] == tuple(s // 2 for s in size)
    model.decoder.deep_supervision = False  # nnU-Net's trainer switches it here
    assert model(torch.randn(1, 1, *size)).shape == (1, 3, *size)
    with pytest.raises(MedstateError, match="must be a multiple of"):
        model(torch.randn(1, 1, *(s + 2 for s in size[:-1]), size[-1] + 1))


def _fit(model, inputs, targets, loss_fn, steps, lr=3e-3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(inputs)
        loss = loss_fn(out[0] if isinstance(out, tuple) else out, targets)
        loss.backward()
        optimizer.step()
    return loss.item()


def test_classifier_overfits_a_tiny_batch():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 12, 12), torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    model = VisionMambaClassifier(ClassifierConfig(num_classes=2, image_size=[12, 12], dim=16, depth=2))
    _fit(model, images, labels, torch.nn.functional.cross_entropy, 60)
    assert (model(images).argmax(1) == labels).all()


def _blobs(dims, size, count=2):
    """Images with a bright box each and its mask: a task a segmenter must learn, not memorise a constant."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(count, 1, *size, generator=generator) * 0.3
    masks = torch.zeros(count, *size, dtype=torch.long)
    for i in range(count):
        corner = [int(torch.randint(0, s // 2, (1,), generator=generator)) for s in size]
        box = tuple(slice(c, c + s // 3 + 1) for c, s in zip(corner, size))
        masks[(i, *box)] = 1
        images[(i, 0, *box)] += 1.0
    return images, masks


@pytest.mark.parametrize("dims,size", [(2, (24, 16)), (3, (8, 12, 8))], ids=["2d", "3d"])
def test_segmenter_overfits_a_tiny_batch(dims, size):
    torch.manual_seed(0)
    images, masks = _blobs(dims, size)
    config = SegmenterConfig(
        num_classes=2,
        spatial_dims=dims,
        features_per_stage=[8, 16, 16],
        strides=[1, 2, 2],
        kernel_sizes=[3, 3, 3],
        mamba_stages=[1, 2],
        mixer=MixerSpec(scan="tri" if dims == 3 else "bidirectional", head_dim=8),
    )
    model = UMambaSegmenter(config)
    _fit(model, images, masks, torch.nn.functional.cross_entropy, 40, lr=1e-2)
    predicted = model(images).argmax(1)
    dice = 2 * (predicted * masks).sum() / (predicted.sum() + masks.sum())
    assert dice > 0.9


def test_mil_is_invariant_to_the_listed_order_when_coordinates_are_given():
    torch.manual_seed(0)
    model = MambaMIL(MILConfig(num_classes=2, in_features=12, dim=16, mixer=MixerSpec(scan="strided", stride=3)))
    bag = torch.randn(1, 20, 12)
    coords = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij"), -1).reshape(1, 20, 2)
    shuffle = torch.randperm(20)
    logits, attention = model(bag, coords)
    shuffled_logits, shuffled_attention = model(bag[:, shuffle], coords[:, shuffle])
    assert torch.allclose(logits, shuffled_logits, atol=1e-5)
    assert torch.allclose(attention[:, shuffle], shuffled_attention, atol=1e-6)
    assert torch.allclose(attention.sum(1), torch.ones(1))
    # without coordinates the listed order is the sequence: a sequence model must see the difference
    plain, _ = model(bag)
    assert not torch.allclose(plain, model(bag[:, shuffle])[0], atol=1e-4)


def test_mil_trains_on_a_tiny_set_of_bags():
    torch.manual_seed(0)
    bags = torch.randn(6, 10, 8)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    bags[labels == 1, 3] += 2.0  # a positive bag holds one bright instance
    model = MambaMIL(MILConfig(num_classes=2, in_features=8, dim=16, depth=1))
    _fit(model, bags, labels, torch.nn.functional.cross_entropy, 40)
    assert (model(bags)[0].argmax(1) == labels).all()


def test_resnet18_has_the_cifar_resnet18_size():
    # 11,173,962 parameters: ResNet-18 with the CIFAR stem and 10 classes, as commonly reported
    model = ResNet18(ResNetConfig(num_classes=10, in_channels=3))
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_mil_shapes_and_attention_on_the_listed_positions():
    model = MambaMIL(MILConfig(num_classes=3, in_features=5, dim=8, depth=1))
    logits, attention = model(torch.randn(2, 7, 5), torch.randint(0, 50, (2, 7, 2)))
    assert logits.shape == (2, 3) and attention.shape == (2, 7)


def test_tokens_layout_matches_scans():
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    assert tokens_of(x)[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.cuda
@pytest.mark.parametrize("version", [1, 2])
def test_cuda_kernels_run_the_same_routes(version):
    from medstate.ssm.ops import cuda

    if not torch.cuda.is_available() or cuda.kernels() is None:
        pytest.skip("needs a CUDA GPU with mamba-ssm and causal-conv1d")
    torch.manual_seed(0)
    block = VisionMambaBlock(32, MixerSpec(version=version, scan="cross", merge="sum"), spatial_dims=2)
    tokens = torch.randn(2, 48, 32)
    expected = block(tokens, (6, 8))
    got = block.cuda()(tokens.cuda(), (6, 8)).cpu()
    assert torch.allclose(got, expected, atol=2e-3, rtol=2e-3)
