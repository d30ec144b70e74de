from diffusionvl.cli import main

raise SystemExit(main())
