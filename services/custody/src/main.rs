fn main() -> std::process::ExitCode {
    cms_custody::PROGRAM.main()
}
