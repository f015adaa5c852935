"""Backbones that end in a d-dimensional feature layer, and the network that puts a head on one."""

from ncsweep.models.mlp import MLP
from ncsweep.models.network import Backbone, Network
from ncsweep.models.ufm import UFMFeatures
from ncsweep.models.vision import VGG, ImageBackbone, ResNet
from ncsweep.models.weights import WeightsNotFound, load_matching_weights, resolve_weights

__all__ = ["MLP", "VGG", "Backbone", "ImageBackbone", "Network", "ResNet", "UFMFeatures",
           "WeightsNotFound", "load_matching_weights", "resolve_weights"]
