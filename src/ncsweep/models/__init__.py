"""Backbones that end in a d-dimensional feature layer, and the network that puts a head on one."""

from ncsweep.models.mlp import MLP
from ncsweep.models.network import Backbone, Network
from ncsweep.models.transfer import WeightsNotFound, load_weights, resolve_weights
from ncsweep.models.ufm import UFMFeatures
from ncsweep.models.vision import VGG, ImageBackbone, ResNet

__all__ = ["MLP", "VGG", "Backbone", "ImageBackbone", "Network", "ResNet", "UFMFeatures",
           "WeightsNotFound", "load_weights", "resolve_weights"]
