"""Map building steps, hloc-style: one module per step, each with a `default_conf` and a `main()`.

    keypoints.main     images -> SIFT or learned (ALIKE, XFeat) features (in memory, corrupt images skipped)
    pairs.main         image pairs: by pose, by GPS, or exhaustive
    matching.main      torch mutual nearest neighbour + ratio test
    triangulation.main known poses -> 3D points (pycolmap), filtered tracks
    sfm.main           incremental SfM (pycolmap), street-sequence initialisation
    georegister.main   robust similarity model -> prior frame (ENU for GPS)
    cells.main         one cell's triangulation (known poses); the cells' points merged cell by cell
                       (cell_merge.py), or all at once by merge.main
    submodels.main     one cell's SfM submodel, registered to its priors; merged by
                       submodels.merge_submodels (aligned through shared images)
    cell_adjustment.main  bundle adjustment of one cell of a merged SfM map, its border fixed
    descriptors.main   one mean descriptor per 3D point, for sparse localization

`jobs/map.py` chains them into `pixloc map`.
"""
