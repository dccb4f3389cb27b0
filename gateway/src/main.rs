fn main() -> std::process::ExitCode {
    cms_gateway::PROGRAM.main()
}
