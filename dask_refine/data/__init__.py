"""Small reference maps shipped with the package (see README.md in this folder)."""

from importlib.resources import files


def demo_map_path():
    """Path of the shipped demo map (PDB 1TII, box 64, 2.0 Å/voxel)."""
    return files(__name__) / "1tii_64_2.0.mrc"
