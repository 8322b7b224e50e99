from icrl_lightning.cli import main

main()
