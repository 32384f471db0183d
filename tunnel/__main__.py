from tunnel.cli import main

main()
