"""Long Range Arena (Tay et al., 2021): data for ListOps, Pathfinder/Path-X/Path-256, Text, Retrieval and Image."""
