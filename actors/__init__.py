"""Thespian actors: each a thin host around a plain logic class."""
