fn main() -> std::process::ExitCode {
    cms_directory::PROGRAM.main()
}
