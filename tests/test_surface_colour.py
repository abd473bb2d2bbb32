import torch

from recon.render.field_views import surface_colour


class ShellField(torch.nn.Module):
    """Dense red ball of radius 0.3 in a blue, empty surrounding (albedo defined everywhere)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, points):
        inside = points.norm(dim=-1) < 0.3
        colour = torch.where(inside[:, None], torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
        return 200.0 * inside.float(), colour


def test_colour_comes_from_the_visible_surface_not_the_mesh_point():
    field = ShellField()
    direction = torch.nn.functional.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    # the mesh strayed 1 cm outside the field's surface: the albedo there is blue fog
    points = direction * 0.31
    assert torch.allclose(field(points)[1], torch.tensor([0.0, 0.0, 1.0]).expand(64, 3))
    colour = surface_colour(field, points, direction, depth=0.03)
    assert torch.allclose(colour, torch.tensor([1.0, 0.0, 0.0]).expand(64, 3), atol=1e-3)


def test_falls_back_to_the_point_where_nothing_is_seen():
    field = ShellField()
    points = torch.tensor([[0.6, 0.0, 0.0]])
    colour = surface_colour(field, points, torch.tensor([[1.0, 0.0, 0.0]]), depth=0.03)
    assert torch.allclose(colour, torch.tensor([[0.0, 0.0, 1.0]]))
