"""``python -m raytrain.eval.report``: the ``raytrain report`` command."""

from raytrain.eval.report import main

if __name__ == "__main__":
    main()
