from ddm.cli import main

main()
